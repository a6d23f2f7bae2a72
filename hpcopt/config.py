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
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or flag is wrong; the message says what and what is allowed."""


ASYNC_METHODS = ("easgd", "eamsgd", "grawa", "mgrawa", "lgrawa", "lsgd")
SYNC_METHODS = ("dp-sgd", "local-sgd", "diloco")
METHODS = ASYNC_METHODS + SYNC_METHODS
SCHEDULES = ("cosine", "constant")
LOCAL_STEPS = ("sgd", "adamw", "sam", "entropy-sgd", "lars")
PRECISIONS = ("fp32", "bf16")


@dataclass(kw_only=True)
class RunConfig:
    method: str = "easgd"
    """asynchronous: easgd (SGD local steps), eamsgd (Nesterov local steps), mgrawa (center weighted by 1/gradient norm; grawa is the same), lgrawa (each layer of the center weighted by 1/that layer's gradient norm), lsgd (pull toward the leader); synchronous baselines: dp-sgd, local-sgd, diloco"""
    servers: int = 1
    """ranks that hold the center variable (each owns one contiguous shard); the other ranks are workers (asynchronous methods; synchronous ones have no servers)"""
    out: str = "runs/demo"
    """run directory; the trajectory goes to OUT/trajectory.h5"""
    seed: int = 0
    """seed for model init, data order and everything random"""
    deterministic: bool = False
    """serve workers in a fixed round-robin order, so a run is bit-reproducible (slower: workers wait for their turn)"""
    threads: int = 1
    """torch intra-op threads per rank (1 is right when ranks share the cores)"""

    def __post_init__(self):
        _choice("run.method", self.method, METHODS)
        _at_least("run.servers", self.servers, 1)
        _at_least("run.threads", self.threads, 1)
        if self.threads > MAX_THREADS:
            raise ConfigError(f"run.threads must be <= {MAX_THREADS}, got {self.threads}")
        if not 0 <= self.seed < MAX_SEED:
            raise ConfigError(f"run.seed must be in [0, 2**40), got {self.seed}")
        if not self.out:
            raise ConfigError("run.out must be a directory path, got an empty string")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "cnn1d"
    """built-in model (cnn1d, mlp) or a user factory 'module:function' returning a torch.nn.Module"""
    kwargs: dict = field(default_factory=dict)
    """keyword arguments passed to the model factory"""

    def __post_init__(self):
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"model.kwargs must be a table, got {self.kwargs!r}")
        problem = _not_toml(self.kwargs, "model.kwargs")
        if problem:
            raise ConfigError(problem)


@dataclass(kw_only=True)
class DataConfig:
    name: str = "mnist1d"
    """mnist1d (generated locally), a path to an HDF5 file with x_train/y_train/x_test/y_test, or 'module:function' returning that dict"""
    batch_size: int = 100
    """minibatch size of each worker"""
    seed: int = 42
    """seed of the MNIST-1D generator (42 gives the standard data set)"""

    def __post_init__(self):
        _at_least("data.batch_size", self.batch_size, 1)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed must be in [0, 2**32), got {self.seed}")


@dataclass(kw_only=True)
class TrainConfig:
    """the local step of each worker"""

    epochs: float = 30.0
    """local passes over the training set, per worker"""
    lr: float = 0.05
    """learning rate eta of the local step"""
    schedule: str = "cosine"
    """learning-rate schedule over each worker's local steps: cosine or constant"""
    warmup_epochs: float = 0.0
    """linear learning-rate warm-up, in epochs"""
    local: str = "sgd"
    """the local step: sgd (with Nesterov momentum when momentum > 0), adamw, sam (SGD on the gradient at the SAM ascent point), entropy-sgd (SGD on the local-entropy gradient) or lars (SGD with per-layer trust ratios, momentum as for sgd)"""
    lars_eta: float = 1e-3
    """lars: trust coefficient eta; layer l's gradient is scaled by eta ||x_l|| / (||g_l|| + weight_decay ||x_l||)"""
    sam_rho: float = 0.05
    """sam: radius rho of the ascent step"""
    langevin_steps: int = 5
    """entropy-sgd: Langevin steps L per local step"""
    langevin_lr: float = 0.1
    """entropy-sgd: learning rate eta' of the Langevin steps"""
    gamma0: float = 0.03
    """entropy-sgd: initial scope gamma; gamma_t = gamma0 (1 + gamma1)^t"""
    gamma1: float = 1e-3
    """entropy-sgd: scoping rate gamma1"""
    langevin_noise: float = 1e-4
    """entropy-sgd: thermal noise epsilon of the Langevin steps"""
    momentum: float | None = None
    """momentum delta of the local step, Nesterov (unset: 0.9 for eamsgd, 0 for the other methods)"""
    weight_decay: float = 0.0
    """L2 weight decay of the local step"""
    precision: str = "fp32"
    """fp32, or bf16: forward pass and loss under bfloat16 autocast (parameters, gradients, exchanges and the center stay float32)"""
    diverge_factor: float = 10.0
    """asynchronous methods: a worker whose training loss is NaN/Inf, or above this many times the run's untrained loss (the seed's initial model on the first batch, the same for every worker) for 3 steps in a row or on average since its last exchange, or whose parameters are not finite, is reset to the center (nothing of it is mixed in)"""
    max_resets: int = 3
    """a worker reset more often than this leaves the run"""

    def __post_init__(self):
        if not 0 < self.epochs <= 1e6:
            raise ConfigError(f"train.epochs must be > 0 and <= 1e6, got {self.epochs}")
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
        if self.momentum == -1.0:  # how configs written before hpcopt 0.2 said "unset"
            self.momentum = None
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _choice("train.precision", self.precision, PRECISIONS)
        if not self.diverge_factor > 1:
            raise ConfigError(f"train.diverge_factor must be > 1, got {self.diverge_factor}")
        _at_least("train.max_resets", self.max_resets, 0)


@dataclass(kw_only=True)
class EASGDConfig:
    """asynchronous methods (tau and alpha also serve mgrawa; tau serves lsgd)"""

    tau: int = 8
    """communication period: local steps between two exchanges with the center"""
    beta: float = 0.9
    """elastic strength summed over workers; alpha = beta / p"""
    alpha: float = 0.0
    """moving rate alpha of each exchange; 0 means beta / p with p the number of workers"""

    def __post_init__(self):
        _at_least("easgd.tau", self.tau, 1)
        if not 0 < self.beta <= 1:
            raise ConfigError(f"easgd.beta must be in (0, 1], got {self.beta}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"easgd.alpha must be in [0, 1] (0 = beta / p), got {self.alpha}")


@dataclass(kw_only=True)
class LSGDConfig:
    """leader SGD"""

    lam: float = 0.1
    """lambda: strength of each worker's pull toward the leader every tau steps"""
    loss_decay: float = 0.0
    """the leader is the worker with the lowest moving average of its reported training losses, with this decay (0: the latest report alone)"""
    tau_g: int = 0
    """two-level LSGD: local steps between two pulls toward the global leader (a multiple of easgd.tau); lam then pulls toward the leader of the worker's node. 0: one level (lam toward the global leader every tau)"""
    lam_g: float = 0.1
    """two-level LSGD: lambda_G, strength of the pull toward the global leader every tau_g steps"""
    group_size: int = 0
    """two-level LSGD: nodes are the workers' hosts (0), or groups of this many consecutive worker ids (to emulate nodes on one machine)"""

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
    """synchronous baselines"""

    period: int = 8
    """local-sgd and diloco: local steps H between two parameter averages"""
    switch_epochs: float = 0.0
    """local-sgd: run plain DP-SGD for this many epochs first (post-local SGD)"""
    outer_lr: float = 0.7
    """diloco: learning rate of the outer Nesterov step"""
    outer_momentum: float = 0.9
    """diloco: momentum of the outer Nesterov step"""

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
    """what goes into the trajectory file (and TensorBoard's live view)"""

    center_every: int = 10
    """exchanges between two center snapshots in the trajectory file"""
    worker_every: int = 20
    """a worker's parameters are recorded at every worker_every-th of its exchanges (0: never)"""
    flush_seconds: float = 2.0
    """servers write buffered records and flush the file this often; a killed job loses at most this interval"""
    eval_seconds: float = 2.0
    """the center is evaluated on the test set at most this often (at a flush)"""
    checkpoint_seconds: float = 10.0
    """servers write OUT/checkpoint.h5 (at a flush) this often, a resume loses at most this interval; workers save their own state as often, but in the background and spending at most 2 percent of their time on it"""
    tensorboard: bool = False
    """server 0 (rank 0 of a synchronous run) writes live metrics as TensorBoard event files to record.tensorboard_dir at every flush (needs pip install 'hpcopt[tensorboard]')"""
    tensorboard_dir: str = ""
    """where the TensorBoard event files go: empty, OUT/tensorboard; a DIR, the run's own subdirectory DIR/NAME-HASH (its run directory's name and a hash of its path), so runs that share DIR never delete each other's events and tensorboard --logdir DIR shows them side by side; `hpcopt train --tensorboard [DIR]` sets both"""

    def __post_init__(self):
        _at_least("record.center_every", self.center_every, 1)
        _at_least("record.worker_every", self.worker_every, 0)
        if not self.flush_seconds > 0:
            raise ConfigError(f"record.flush_seconds must be > 0, got {self.flush_seconds}")
        if self.eval_seconds < 0:
            raise ConfigError(f"record.eval_seconds must be >= 0, got {self.eval_seconds}")
        if self.checkpoint_seconds < 0:
            raise ConfigError(f"record.checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")


COMPRESS_FORMATS = ("none", "bf16", "int8", "int4", "int2", "top8")  # hpcopt.comm.codec


@dataclass(kw_only=True)
class CommConfig:
    timeout: float = 120.0
    """seconds any wait on another rank may last before the run fails with a clear error"""
    worker_timeout: float = 10.0
    """servers drop a worker (as crashed) that sent nothing for this many seconds; workers send heartbeats meanwhile"""
    chunk_mb: float = 1.0
    """parameters travel in chunks of this many MB so the server computes while the rest arrives"""
    shared_memory: bool = True
    """a worker on a server's node keeps its parameters in shared memory and that server updates them in place (no copies); false: always messages. LSGD and joined workers use messages"""
    compress: str = "none"
    """exchanges over messages (and Local SGD's and DiLoCo's averages) send the change since the last one in this format: none (float32 parameters), bf16, int8, int4 or int2 (per-block scales), or top8 (the 8 largest of every 256 values, int8), with error feedback; not LSGD or DP-SGD, not in place"""
    overlap: bool = False
    """a worker keeps stepping while its exchange travels (in a thread, on a copy of its parameters) and applies the exchange's move when it completes, at most one period late; not with run.deterministic"""

    def __post_init__(self):
        if not self.timeout > 0:
            raise ConfigError(f"comm.timeout must be > 0 seconds, got {self.timeout}")
        if not self.worker_timeout > 0:
            raise ConfigError(f"comm.worker_timeout must be > 0 seconds, got {self.worker_timeout}")
        if not self.chunk_mb > 0:
            raise ConfigError(f"comm.chunk_mb must be > 0, got {self.chunk_mb}")
        if self.compress not in COMPRESS_FORMATS:
            raise ConfigError(f"comm.compress must be one of {', '.join(COMPRESS_FORMATS)}, got {self.compress!r}")


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

    def __post_init__(self):
        for section in SECTIONS:  # also for a Config built in code rather than loaded
            part = getattr(self, section)
            for f in dataclasses.fields(part):
                _check_number(f"{section}.{f.name}", getattr(part, f.name))
        if self.comm.overlap and self.synchronous:
            raise ConfigError(f"comm.overlap applies to the asynchronous methods' exchanges; {self.run.method} "
                              f"synchronizes every round: set it false")
        if self.comm.overlap and self.run.deterministic:
            raise ConfigError("comm.overlap makes when a move lands depend on timing: it cannot be "
                              "run.deterministic; set one of them false")
        if self.comm.compress != "none" and self.run.method == "dp-sgd":
            raise ConfigError("comm.compress applies to parameter averages (local-sgd, diloco) and exchanges; "
                              "dp-sgd's gradients go plain: leave it \"none\"")
        if self.comm.compress != "none" and self.run.method == "lsgd":
            raise ConfigError("comm.compress does not apply to lsgd (only the leaders' parameters travel); "
                              "leave it \"none\"")

    @property
    def synchronous(self) -> bool:
        return self.run.method in SYNC_METHODS

    @property
    def momentum(self) -> float:
        """The local step's momentum delta, with the method's default resolved."""
        if self.train.momentum is not None:
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


MAX_SEED = 2**40  # run.seed: workers derive theirs from it (seed * 1_000_003 + id) within torch's 64 bits
MAX_THREADS = 4096
MAX_INT = 2**63  # TOML integers are 64-bit; every count and period fits well below


def _check_number(name, value):
    """A config number must be finite (no field takes NaN or infinity) and fit in 64 bits."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if isinstance(value, int) and not -MAX_INT <= value < MAX_INT:
        raise ConfigError(f"{name} must fit in 64 bits, got {value}")


def _not_toml(value, where) -> str | None:
    """Why `value` (model.kwargs) cannot be written to the run's config.toml, or None."""
    if value is None:
        return f"{where} is null, which TOML cannot hold: leave the key out (the factory's default applies)"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r}"
            problem = _not_toml(v, f"{where}.{k}")
            if problem:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            problem = _not_toml(v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} must be a finite number, got {value}"
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT <= value < MAX_INT:
        return f"{where} must fit in 64 bits, got {value}"
    if isinstance(value, (bool, int, float, str)):
        return None
    return f"{where} = {value!r} cannot be written as TOML"


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
    if kind.endswith(" | None"):  # unset: a missing key (TOML has no null), or "none" on the command line
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        kind = kind[:-len(" | None")]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            _check_number(name, value)
            return value
        if isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                pass
            else:
                _check_number(name, number)
                return number
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_number(name, float(value))
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                _check_number(name, number)
                return number
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
    """(section, field, type name, default, doc) for every config field: the CLI's flags and the
    README's reference (hpcopt.flags), from the one-line docstrings under the fields."""
    from hpcopt.flags import described

    for section, cls in SECTIONS.items():
        for name, kind, default, doc in described(cls):
            yield section, name, kind, default, doc


def dump_toml(data: dict) -> str:
    """Write nested dicts of plain values as TOML (enough for Config; no dependency needed)."""
    def key(k):
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {value(v)}" for k, v in values.items() if v is not None)  # None: unset
        lines.append("")
    return "\n".join(lines)
