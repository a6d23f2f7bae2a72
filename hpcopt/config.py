"""Run configuration: keyword-only dataclasses loaded from TOML.

A config file has one table per section below; every key is optional and defaults to the value
shown by ``hpcopt train --help``. An unknown section or key fails with the list of valid ones, a
bad value fails with the value and what is allowed. Command-line flags ``--section.key VALUE``
override the file.

    [run]
    method = "eamsgd"
    [easgd]
    tau = 8
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or flag is wrong; the message says what and what is allowed."""


def _doc(text: str, **kw) -> Any:
    return field(metadata={"doc": text}, **kw)


ASYNC_METHODS = ("easgd", "eamsgd", "grawa", "mgrawa", "lgrawa", "lsgd")
SYNC_METHODS = ("dp-sgd", "local-sgd", "diloco")
METHODS = ASYNC_METHODS + SYNC_METHODS
SCHEDULES = ("cosine", "constant")
LOCAL_STEPS = ("sgd", "adamw", "sam", "entropy-sgd", "lars")


@dataclass(kw_only=True)
class RunConfig:
    method: str = _doc("asynchronous: easgd (SGD local steps), eamsgd (Nesterov local steps), mgrawa (center weighted by 1/gradient norm; grawa is the same), lgrawa (each layer of the center weighted by 1/that layer's gradient norm), lsgd (pull toward the leader); synchronous baselines: dp-sgd, local-sgd, diloco", default="easgd")
    servers: int = _doc("ranks that hold the center variable (each owns one contiguous shard); the other ranks are workers (asynchronous methods; synchronous ones have no servers)", default=1)
    out: str = _doc("run directory; the trajectory goes to OUT/trajectory.h5", default="runs/demo")
    seed: int = _doc("seed for model init, data order and everything random", default=0)
    deterministic: bool = _doc("serve workers in a fixed round-robin order, so a run is bit-reproducible (slower: workers wait for their turn)", default=False)
    threads: int = _doc("torch intra-op threads per rank (1 is right when ranks share the cores)", default=1)

    def __post_init__(self):
        _choice("run.method", self.method, METHODS)
        _at_least("run.servers", self.servers, 1)
        _at_least("run.threads", self.threads, 1)
        if not self.out:
            raise ConfigError("run.out must be a directory path, got an empty string")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = _doc("built-in model (cnn1d, mlp) or a user factory 'module:function' returning a torch.nn.Module", default="cnn1d")
    kwargs: dict = _doc("keyword arguments passed to the model factory", default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"model.kwargs must be a table, got {self.kwargs!r}")


@dataclass(kw_only=True)
class DataConfig:
    name: str = _doc("mnist1d (generated locally), a path to an HDF5 file with x_train/y_train/x_test/y_test, or 'module:function' returning that dict", default="mnist1d")
    batch_size: int = _doc("minibatch size of each worker", default=100)
    seed: int = _doc("seed of the MNIST-1D generator (42 gives the standard data set)", default=42)

    def __post_init__(self):
        _at_least("data.batch_size", self.batch_size, 1)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: float = _doc("local passes over the training set, per worker", default=30.0)
    lr: float = _doc("learning rate eta of the local step", default=0.05)
    schedule: str = _doc("learning-rate schedule over each worker's local steps: cosine or constant", default="cosine")
    warmup_epochs: float = _doc("linear learning-rate warm-up, in epochs", default=0.0)
    local: str = _doc("the local step: sgd (with Nesterov momentum when momentum > 0), adamw, sam (SGD on the gradient at the SAM ascent point), entropy-sgd (SGD on the local-entropy gradient) or lars (SGD with per-layer trust ratios, momentum as for sgd)", default="sgd")
    lars_eta: float = _doc("lars: trust coefficient eta; layer l's gradient is scaled by eta ||x_l|| / (||g_l|| + weight_decay ||x_l||)", default=1e-3)
    sam_rho: float = _doc("sam: radius rho of the ascent step", default=0.05)
    langevin_steps: int = _doc("entropy-sgd: Langevin steps L per local step", default=5)
    langevin_lr: float = _doc("entropy-sgd: learning rate eta' of the Langevin steps", default=0.1)
    gamma0: float = _doc("entropy-sgd: initial scope gamma; gamma_t = gamma0 (1 + gamma1)^t", default=0.03)
    gamma1: float = _doc("entropy-sgd: scoping rate gamma1", default=1e-3)
    langevin_noise: float = _doc("entropy-sgd: thermal noise epsilon of the Langevin steps", default=1e-4)
    momentum: float = _doc("momentum delta of the local step (eamsgd: Nesterov; default 0.9 for eamsgd, 0 for easgd)", default=-1.0)
    weight_decay: float = _doc("L2 weight decay of the local step", default=0.0)
    diverge_factor: float = _doc("asynchronous methods: a worker whose training loss is NaN/Inf or above this many times its first reported loss is reset to the center (its parameters are not mixed in)", default=10.0)
    max_resets: int = _doc("a worker reset more often than this leaves the run", default=3)

    def __post_init__(self):
        if not self.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.local", self.local, LOCAL_STEPS)
        if not self.lars_eta > 0:
            raise ConfigError(f"train.lars_eta must be > 0, got {self.lars_eta}")
        if not self.sam_rho > 0:
            raise ConfigError(f"train.sam_rho must be > 0, got {self.sam_rho}")
        _at_least("train.langevin_steps", self.langevin_steps, 1)
        for name in ("langevin_lr", "gamma0"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma1", "langevin_noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.momentum != -1.0 and not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.diverge_factor > 1:
            raise ConfigError(f"train.diverge_factor must be > 1, got {self.diverge_factor}")
        _at_least("train.max_resets", self.max_resets, 0)


@dataclass(kw_only=True)
class EASGDConfig:
    tau: int = _doc("communication period: local steps between two exchanges with the center", default=8)
    beta: float = _doc("elastic strength summed over workers; alpha = beta / p", default=0.9)
    alpha: float = _doc("moving rate alpha of each exchange; 0 means beta / p with p the number of workers", default=0.0)

    def __post_init__(self):
        _at_least("easgd.tau", self.tau, 1)
        if not 0 < self.beta <= 1:
            raise ConfigError(f"easgd.beta must be in (0, 1], got {self.beta}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"easgd.alpha must be in [0, 1] (0 = beta / p), got {self.alpha}")


@dataclass(kw_only=True)
class LSGDConfig:
    lam: float = _doc("lambda: strength of each worker's pull toward the leader every tau steps", default=0.1)
    loss_decay: float = _doc("the leader is the worker with the lowest moving average of its reported training losses, with this decay (0: the latest report alone)", default=0.0)
    tau_g: int = _doc("two-level LSGD: local steps between two pulls toward the global leader (a multiple of easgd.tau); lam then pulls toward the leader of the worker's node. 0: one level (lam toward the global leader every tau)", default=0)
    lam_g: float = _doc("two-level LSGD: lambda_G, strength of the pull toward the global leader every tau_g steps", default=0.1)
    group_size: int = _doc("two-level LSGD: nodes are the workers' hosts (0), or groups of this many consecutive worker ids (to emulate nodes on one machine)", default=0)

    def __post_init__(self):
        if not 0 < self.lam <= 1:
            raise ConfigError(f"lsgd.lam must be in (0, 1], got {self.lam}")
        if not 0 <= self.loss_decay < 1:
            raise ConfigError(f"lsgd.loss_decay must be in [0, 1), got {self.loss_decay}")
        _at_least("lsgd.tau_g", self.tau_g, 0)
        _at_least("lsgd.group_size", self.group_size, 0)
        if not 0 <= self.lam_g <= 1:
            raise ConfigError(f"lsgd.lam_g must be in [0, 1], got {self.lam_g}")


@dataclass(kw_only=True)
class SyncConfig:
    period: int = _doc("local-sgd and diloco: local steps H between two parameter averages", default=8)
    switch_epochs: float = _doc("local-sgd: run plain DP-SGD for this many epochs first (post-local SGD)", default=0.0)
    outer_lr: float = _doc("diloco: learning rate of the outer Nesterov step", default=0.7)
    outer_momentum: float = _doc("diloco: momentum of the outer Nesterov step", default=0.9)

    def __post_init__(self):
        _at_least("sync.period", self.period, 1)
        if self.switch_epochs < 0:
            raise ConfigError(f"sync.switch_epochs must be >= 0, got {self.switch_epochs}")
        if not self.outer_lr > 0:
            raise ConfigError(f"sync.outer_lr must be > 0, got {self.outer_lr}")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"sync.outer_momentum must be in [0, 1), got {self.outer_momentum}")


@dataclass(kw_only=True)
class RecordConfig:
    center_every: int = _doc("exchanges between two center snapshots in the trajectory file", default=10)
    worker_every: int = _doc("a worker's parameters are recorded at every worker_every-th of its exchanges (0: never)", default=20)
    flush_seconds: float = _doc("servers write buffered records and flush the file this often; a killed job loses at most this interval", default=2.0)
    eval_seconds: float = _doc("the center is evaluated on the test set at most this often (at a flush)", default=2.0)
    checkpoint_seconds: float = _doc("servers write OUT/checkpoint.h5 (at a flush) and workers their own state this often; a resume loses at most this interval", default=10.0)

    def __post_init__(self):
        _at_least("record.center_every", self.center_every, 1)
        _at_least("record.worker_every", self.worker_every, 0)
        if not self.flush_seconds > 0:
            raise ConfigError(f"record.flush_seconds must be > 0, got {self.flush_seconds}")
        if self.eval_seconds < 0:
            raise ConfigError(f"record.eval_seconds must be >= 0, got {self.eval_seconds}")
        if self.checkpoint_seconds < 0:
            raise ConfigError(f"record.checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")


@dataclass(kw_only=True)
class CommConfig:
    timeout: float = _doc("seconds any wait on another rank may last before the run fails with a clear error", default=120.0)
    worker_timeout: float = _doc("servers drop a worker (as crashed) that sent nothing for this many seconds; workers send heartbeats meanwhile", default=10.0)
    chunk_mb: float = _doc("parameters travel in chunks of this many MB so the server computes while the rest arrives", default=1.0)
    shared_memory: bool = _doc("a worker on a server's node keeps its parameters in shared memory and that server updates them in place (no copies); false: always messages. LSGD and joined workers use messages", default=True)

    def __post_init__(self):
        if not self.timeout > 0:
            raise ConfigError(f"comm.timeout must be > 0 seconds, got {self.timeout}")
        if not self.worker_timeout > 0:
            raise ConfigError(f"comm.worker_timeout must be > 0 seconds, got {self.worker_timeout}")
        if not self.chunk_mb > 0:
            raise ConfigError(f"comm.chunk_mb must be > 0, got {self.chunk_mb}")


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    easgd: EASGDConfig = field(default_factory=EASGDConfig)
    lsgd: LSGDConfig = field(default_factory=LSGDConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    @property
    def synchronous(self) -> bool:
        return self.run.method in SYNC_METHODS

    @property
    def momentum(self) -> float:
        """The local step's momentum delta, with the method's default resolved."""
        if self.train.momentum >= 0:
            return self.train.momentum
        return 0.9 if self.run.method == "eamsgd" else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


SECTIONS: dict[str, type] = {
    "run": RunConfig, "model": ModelConfig, "data": DataConfig, "train": TrainConfig,
    "easgd": EASGDConfig, "lsgd": LSGDConfig, "sync": SyncConfig, "record": RecordConfig, "comm": CommConfig,
}


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of: {', '.join(allowed)}")


def _at_least(name, value, low):
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Check a TOML/CLI value against the field's type; ints are accepted for floats."""
    name = f"{section}.{f.name}"
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "dict":
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
    raise ConfigError(f"{name} must be a {kind}, got {value!r}")


def from_dict(data: dict, origin: str = "config") -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys with the valid lists."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a table of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{origin}: unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{name}] must be a table, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - set(fields))
        if bad:
            raise ConfigError(f"{origin}: unknown key(s) {', '.join(name + '.' + b for b in bad)}; "
                              f"valid keys in [{name}]: {', '.join(fields)}")
        kwargs = {k: _coerce(name, fields[k], v) for k, v in values.items()}
        sections[name] = cls(**kwargs)
    return Config(**sections)


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML config (or the defaults when path is None) and apply 'section.key' overrides."""
    data: dict = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r} must look like section.key")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        data[section][key] = value
    return from_dict(data, origin)


def fields_for_cli():
    """(section, field, type name, default, doc) for every config field: the CLI's flags."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield section, f.name, (f.type if isinstance(f.type, str) else f.type.__name__), default, f.metadata.get("doc", "")


def dump_toml(data: dict) -> str:
    """Write nested dicts of plain values as TOML (enough for Config; no dependency needed)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)
