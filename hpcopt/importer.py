"""`hpcopt import`: a training's saved state_dicts (checkpoints) as a trajectory, one center
snapshot per file, so `hpcopt analyze` and `--compare` work on a training that only left
checkpoints behind.

    hpcopt import ckpts/ --model mypkg.models:make_net --data mypkg.data:load -o runs/theirs
    hpcopt import ckpts/init.pt ckpts/best.pt ckpts/last.pt --model cnn1d -o runs/three   # this order

A directory's `*.pt` and `*.pth` files are taken in natural order of their names (step_9 before
step_10); files named one by one are taken in the order given. Every file is read and checked
against the model before anything is written, so a file that is not a state_dict, is corrupt,
lacks a key or has an extra one, or holds a tensor of another shape, is an error naming the file,
and no run is left behind. The run directory is written as `hpcopt.Recorder` writes one
(hpcopt.record.RunFile).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".pt", ".pth")
WRAPPERS = ("state_dict", "model_state_dict", "model")  # where training scripts often keep the state_dict
PREFIXES = ("module.", "_orig_mod.")  # what DDP and torch.compile put before every name


class ImportFailed(ValueError):
    """The checkpoints cannot be imported as asked; the message names the file and says why."""


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: step_9 before step_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def checkpoint_files(sources: list[str]) -> list[Path]:
    """One directory: its *.pt/*.pth files in natural order; otherwise the files as given."""
    if len(sources) == 1 and Path(sources[0]).is_dir():
        folder = Path(sources[0])
        files = sorted((p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file()),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise ImportFailed(f"{folder} holds no {' or '.join('*' + s for s in SUFFIXES)} file")
        return files
    files = [Path(s) for s in sources]
    for f in files:
        if not f.is_file():
            raise ImportFailed(f"{f}: no such file" + (" (a directory comes alone: hpcopt import DIR)"
                                                      if f.is_dir() else ""))
    return files


def step_numbers(files: list[Path]) -> list[int]:
    """Each checkpoint's step: the last number in its name, when every name has one and they
    increase in the files' order; otherwise 0, 1, 2, ..."""
    numbers = [re.findall(r"\d+", f.stem) for f in files]
    if all(numbers):
        steps = [int(n[-1]) for n in numbers]
        if all(a < b for a, b in zip(steps, steps[1:])):
            return steps
    return list(range(len(files)))


def read_state_dict(path: Path) -> dict:
    """The state_dict a file holds (also inside a dict under state_dict, model_state_dict or
    model; a DDP or torch.compile prefix on every name is dropped). Loaded with
    weights_only=True: a checkpoint cannot run code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise ImportFailed(f"{path}: cannot be read as a PyTorch file ({type(e).__name__}: {why})") from None
    if isinstance(obj, dict):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        what = f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict) and obj \
            else type(obj).__name__
        raise ImportFailed(f"{path} is not a state_dict (names of parameters -> tensors): it holds {what}")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def check(path: Path, state: dict, model: torch.nn.Module, spec: str) -> None:
    """`state` must load into `model` strictly: the same keys, the same shapes, finite floats."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = ([f"missing {_some(missing)}"] if missing else []) + ([f"unexpected {_some(extra)}"] if extra else [])
        raise ImportFailed(f"{path} does not fit model {spec}: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ImportFailed(f"{path}: {k} has shape {tuple(state[k].shape)}, but model {spec} has "
                               f"{tuple(v.shape)}")
    for k, p in model.named_parameters():
        if p.requires_grad and not (state[k].is_floating_point() and torch.isfinite(state[k]).all()):
            raise ImportFailed(f"{path}: parameter {k} is not finite floating point ({state[k].dtype})")


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def import_checkpoints(sources: list[str], out, *, model_factory: str, model_kwargs: dict | None = None,
                       data: str | None = None, data_seed: int = 42, seed: int = 0, method: str = "pytorch",
                       overwrite: bool = False, log=print) -> Path:
    """Write the run `out` with the checkpoints as center snapshots; returns its trajectory file.
    With `data`, each snapshot is also evaluated on the test split (an /evals row)."""
    from hpcopt.models import build_model
    from hpcopt.models.flat import parameter_layout
    from hpcopt.record import RecorderError, RunFile, flat_parameters, recorded_config

    files = checkpoint_files(sources)
    steps = step_numbers(files)
    cfg = recorded_config(out, model_factory=model_factory, model_kwargs=model_kwargs, data=data,
                          data_seed=data_seed, seed=seed, every=1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(model_factory, model_kwargs).to(torch.float32)
    except ValueError as e:
        raise ImportFailed(str(e)) from None
    for f in files:  # all checked before anything is written
        check(f, read_state_dict(f), model, model_factory)
    test = None
    if data is not None:
        from hpcopt.data import load_data

        d = load_data(data, data_seed)
        test = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
        try:
            with torch.no_grad():
                model(test[0][:2])
        except Exception as e:  # a user's model and data: their error, in one line
            raise ImportFailed(f"model {model_factory} cannot take data {data} (inputs of shape "
                               f"{tuple(test[0].shape[1:])}): {type(e).__name__}: {e}") from None
    times = [f.stat().st_mtime for f in files]
    run = RunFile(out, parameter_layout(model), cfg, method=method, source="hpcopt import",
                  hosts={}, overwrite=overwrite)
    from hpcopt.io.schema import event_row

    try:
        run.write(events=[event_row(0.0, "start", detail=f"imported from {len(files)} checkpoint(s)")],
                  wall_seconds=0.0)
        for f, step, mtime in zip(files, steps, times):
            model.load_state_dict(read_state_dict(f))
            t = mtime - times[0]  # when the files were written, seconds after the first one
            evals = []
            if test is not None:
                from hpcopt.models.evaluate import evaluate

                with torch.no_grad():
                    loss, acc = evaluate(model, *test)
                evals = [(step, t, loss, acc)]
            run.write(center=[(step, t, flat_parameters(model))], evals=evals, wall_seconds=t)
            log(f"  {f.name}: step {step}" + (f", test accuracy {100 * evals[0][3]:.2f}%" if evals else ""))
        run.write(events=[event_row(t, "end", detail=f"{len(files)} checkpoints")], wall_seconds=t,
                  status="complete")
    except BaseException as e:  # a file that changed since the check, a full disk, Ctrl-C: no half run
        run.discard()
        if isinstance(e, (RecorderError, ImportFailed, OSError)):
            raise ImportFailed(str(e)) from None
        raise
    run.close()
    return run.run.trajectory


def add_parser(sub) -> None:
    """The `hpcopt import` subcommand."""
    import argparse

    p = sub.add_parser(
        "import", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="turn a directory of saved state_dicts (another training's checkpoints) into a trajectory",
        description="Write a run whose center snapshots are saved PyTorch state_dicts, so that `hpcopt analyze`\n"
                    "(and --compare with hpcopt's own runs) and `hpcopt inspect` work on a training hpcopt did\n"
                    "not run.\n\n"
                    "  hpcopt import ckpts/ --model mypkg.models:make_net --data mypkg.data:load -o runs/theirs\n"
                    "  hpcopt import a.pt b.pt c.pt --model cnn1d --data mnist1d -o runs/three   # in this order\n\n"
                    "A directory's *.pt and *.pth files are taken in natural order of their names (step_9 before\n"
                    "step_10); to choose the order, name the files one by one. Each file is a state_dict, or a\n"
                    "dict holding one under state_dict, model_state_dict or model (a module./_orig_mod. prefix\n"
                    "on every key is dropped). Every file is checked against the model before anything is\n"
                    "written: a file that is not a state_dict or is corrupt, a missing or extra key, a tensor\n"
                    "of another shape, or non-finite parameters is an error naming the file, and no run is\n"
                    "left behind.",
        epilog="The step of each snapshot is the last number in its file's name when every name has one and\n"
               "they increase (else 0, 1, 2, ...); its time is the file's modification time after the first.\n"
               "In Python, hpcopt.Recorder records a training as it runs (README: Your own training loop).")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a directory of checkpoints, or checkpoint files in the order to take them")
    p.add_argument("--model", required=True, metavar="FACTORY",
                   help="the model the state_dicts belong to: a built-in (cnn1d, mlp) or 'module:function' "
                        "returning the torch.nn.Module (importable here and wherever you analyse the run)")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments of the model factory, "
                   "as a JSON object (default: {})")
    p.add_argument("--data", metavar="DATA", help="the data analysis measures the loss on: mnist1d, an HDF5 file "
                   "or 'module:function' (as [data] name of hpcopt train); each snapshot is also evaluated on "
                   "its test split. Without it, analysis can measure the trajectory only")
    p.add_argument("--data-seed", type=int, default=42, metavar="N", help="[data] seed (default: 42)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed torch gets before the model is built (buffers keep those values; default: 0)")
    p.add_argument("--method", default="pytorch", metavar="LABEL",
                   help="the method's name in reports and hpcopt inspect (default: pytorch)")
    p.add_argument("-o", "--out", required=True, metavar="RUN", help="the run directory to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing RUN/trajectory.h5")


def main(args) -> int:
    """`hpcopt import`: 0 done, 2 bad input (nothing written)."""
    import json
    import sys

    try:
        kwargs = json.loads(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not an object")
    except ValueError as e:
        print(f"hpcopt import: error: --model-kwargs {args.model_kwargs!r} must be a JSON object ({e})",
              file=sys.stderr)
        return 2
    try:
        path = import_checkpoints(args.sources, args.out, model_factory=args.model, model_kwargs=kwargs,
                                  data=args.data, data_seed=args.data_seed, seed=args.seed, method=args.method,
                                  overwrite=args.force)
    except ValueError as e:  # ImportFailed, and the run directory's own refusals (hpcopt.record)
        print(f"hpcopt import: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}   (see it with: hpcopt inspect {path}; analyse it with: hpcopt analyze {args.out})")
    return 0
