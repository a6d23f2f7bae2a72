"""`hpcopt import`: a training's saved state_dicts (checkpoints) as a trajectory, one center
snapshot per file, so `hpcopt analyze` and `--compare` work on a training that only left
checkpoints behind.

    hpcopt import ckpts/ --model mypkg.models:make_net --data mypkg.data:load -o runs/theirs
    hpcopt import ckpts/init.pt ckpts/best.pt ckpts/last.pt --model cnn1d -o runs/three   # this order

A directory's `*.pt`, `*.pth` and `*.ckpt` files (any case) are taken in the order of their step
numbers when every name has one, else in natural order of their names (step_9 before step_10);
files named one by one are taken in the order given. A file's step is the number after step,
global_step, iter or epoch in its name (`epoch=0-step=100.ckpt`: 100; `epoch1_acc0.71.pt`: 1),
else its last whole number (digits after a '.' are a fraction, not a step). Every file is read and
checked against the model before anything is written, so a file that is not a state_dict, is
corrupt, lacks a key or has an extra one, or holds a tensor of another shape, is an error naming
the file, and nothing is left behind; with --force an existing run is replaced only once the new
one is written in full. The run directory is written as `hpcopt.Recorder` writes one
(hpcopt.record.RunFile), with RUN/center.pt the last checkpoint's state_dict.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

SUFFIXES = (".pt", ".pth", ".ckpt")  # .ckpt: Lightning's (the weights under state_dict, named model.*)
WRAPPERS = ("state_dict", "model_state_dict", "model")  # where training scripts often keep the state_dict
PREFIXES = ("module.", "_orig_mod.")  # what DDP and torch.compile put before every name
MAX_STEP = 2 ** 63 - 1  # the trajectory's step counters are int64
# the number after one of these words names the step (the first word found wins: step before epoch)
STEP_WORDS = ("global_step", "step", "iteration", "iter", "it", "epoch")


class ImportFailed(ValueError):
    """The checkpoints cannot be imported as asked; the message names the file and says why."""


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: step_9 before step_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def checkpoint_files(sources: list[str], log=print) -> list[Path]:
    """One directory: its *.pt/*.pth/*.ckpt files (any case) in the order of their step numbers
    (natural order of the names when some have none); otherwise the files as given. A checkpoint
    name that leads nowhere (a dangling symbolic link) is an error; a directory with such a name
    is skipped with a note."""
    if len(sources) == 1 and Path(sources[0]).is_dir():
        folder = Path(sources[0])
        files = []
        for p in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
            if p.suffix.lower() not in SUFFIXES:
                continue
            if p.is_file():
                files.append(p)
            elif p.is_dir():
                log(f"  note: skipped {p.name}: a directory, not a checkpoint file")
            else:
                raise ImportFailed(_not_a_file(p))
        if not files:
            raise ImportFailed(f"{folder} holds no {', '.join('*' + s for s in SUFFIXES)} file")
        steps = [name_step(p) for p in files]
        if all(s is not None for s in steps) and len(set(steps)) == len(steps):
            files = [p for _, p in sorted(zip(steps, files), key=lambda t: t[0])]
        return files
    files = [Path(s) for s in sources]
    for f in files:
        if not f.is_file():
            raise ImportFailed(_not_a_file(f))
    return files


def _not_a_file(p: Path) -> str:
    if p.is_symlink():
        return f"{p} is a symbolic link to {os.readlink(p)}, which leads to no file"
    if p.is_dir():
        return f"{p} is a directory (a directory of checkpoints comes alone: hpcopt import DIR)"
    return f"{p}: no such file"


def name_step(path: Path) -> int | None:
    """The step a checkpoint's name gives: the number after step/global_step/iter/epoch (the
    first of these words found), else the last whole number of the name; the digits after a
    number's '.' are its fraction (acc0.71), not a number of their own. None without a number."""
    for word in STEP_WORDS:
        m = re.search(rf"(?<![a-z]){word}s?[=_\-]?(\d+)", path.stem, re.IGNORECASE)
        if m:
            return int(m.group(1))
    numbers = re.findall(r"(?<!\d\.)(?<!\d)\d+", path.stem)  # not the 71 of acc0.71
    return int(numbers[-1]) if numbers else None


def step_numbers(files: list[Path], log=print) -> list[int]:
    """Each checkpoint's step from its name (name_step), when every name has one, they fit 64
    bits and increase in the files' order; otherwise 0, 1, 2, ... (said in a note when the names
    had numbers that could not be used)."""
    steps = [name_step(f) for f in files]
    if all(s is not None for s in steps):
        huge = [f.name for f, s in zip(files, steps) if s > MAX_STEP]
        if huge:
            log(f"  note: the number in {huge[0]} is too large for a step (at most {MAX_STEP}): "
                f"steps are 0, 1, 2, ... in the files' order")
        elif all(a < b for a, b in zip(steps, steps[1:])):
            return steps
        elif len(files) > 1:
            log("  note: the numbers in the names do not increase in the files' order: steps are 0, 1, 2, ...")
    return list(range(len(files)))


def read_state_dict(path: Path) -> dict:
    """The state_dict a file holds (also inside a dict under state_dict, model_state_dict or
    model; a DDP or torch.compile prefix on every name is dropped). Loaded with
    weights_only=True: a checkpoint cannot run code."""
    import torch  # (lazily: `hpcopt status`/`inspect` build this parser and need no torch)

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


def fit_names(state: dict, model: torch.nn.Module) -> dict:
    """`state` with a dotted prefix every key shares dropped (Lightning's `model.`, a wrapper's
    attribute name; several levels), when the names then are the model's exactly; else as it is."""
    expected = set(model.state_dict())
    names = state
    while set(names) != expected:
        first = {k.split(".", 1)[0] for k in names}
        if len(first) != 1 or not all("." in k for k in names):
            return state
        prefix = first.pop() + "."
        names = {k[len(prefix):]: v for k, v in names.items()}
    return names


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """The state_dict in `path`, its names fitted to `model`'s (fit_names)."""
    return fit_names(read_state_dict(path), model)


def check(path: Path, state: dict, model: torch.nn.Module, spec: str) -> None:
    """`state` must load into `model` strictly: the same keys, the same shapes, finite floats."""
    import torch  # (lazily: `hpcopt status`/`inspect` build this parser and need no torch)

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
    import torch

    from hpcopt.models import build_model
    from hpcopt.models.flat import parameter_layout
    from hpcopt.record import RecorderError, RunFile, flat_parameters, recorded_config, untracked_note

    files = checkpoint_files(sources, log=log)
    steps = step_numbers(files, log=log)
    cfg = recorded_config(out, model_factory=model_factory, model_kwargs=model_kwargs, data=data,
                          data_seed=data_seed, seed=seed, every=1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(model_factory, model_kwargs).to(torch.float32)
    except ValueError as e:
        raise ImportFailed(str(e)) from None
    except Exception as e:  # the user's factory failed: its error, in one line
        raise ImportFailed(f"model {model_factory} failed to build: {type(e).__name__}: {e}") from None
    for f in files:  # all checked before anything is written
        check(f, load_checkpoint(f, model), model, model_factory)
    test = None
    if data is not None:
        from hpcopt.data import load_data

        try:
            d = load_data(data, data_seed)
        except ValueError:
            raise
        except Exception as e:  # a user's data function failed: its error, in one line
            raise ImportFailed(f"data {data} failed to load: {type(e).__name__}: {e}") from None
        test = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
        try:
            with torch.no_grad():
                model(test[0][:2])
        except Exception as e:  # a user's model and data: their error, in one line
            raise ImportFailed(f"model {model_factory} cannot take data {data} (inputs of shape "
                               f"{tuple(test[0].shape[1:])}): {type(e).__name__}: {e}") from None
    times = [f.stat().st_mtime for f in files]
    note = untracked_note(model, "RUN/center.pt holds the last checkpoint's")
    if note:
        log(f"  note: {note}")
    # staged: an existing run (--force) is replaced only when the new one is complete
    run = RunFile(out, parameter_layout(model), cfg, method=method, source="hpcopt import",
                  hosts={}, overwrite=overwrite, staged=True)
    from hpcopt.export import state_dict_of
    from hpcopt.io.schema import event_row

    try:
        run.write(events=[event_row(0.0, "start", detail=f"imported from {len(files)} checkpoint(s)")],
                  wall_seconds=0.0)
        for f, step, mtime in zip(files, steps, times):
            model.load_state_dict(load_checkpoint(f, model))
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
        if isinstance(e, (RecorderError, ImportFailed)):
            raise ImportFailed(str(e)) from None
        if isinstance(e, Exception):  # anything else (OSError included): one line, the old run intact
            raise ImportFailed(f"the import into {out} failed ({type(e).__name__}: {e}); nothing of it was kept, "
                               f"and a run there before is as it was") from None
        raise
    try:
        run.commit(state_dict_of(model))  # the last checkpoint's full state: RUN/center.pt
    except RecorderError as e:
        raise ImportFailed(str(e)) from None
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
                    "A directory's *.pt, *.pth and *.ckpt files (any case) are taken in the order of the step\n"
                    "numbers in their names, else in natural order (step_9 before step_10); to choose the\n"
                    "order, name the files one by one. Each file is a state_dict, or a dict holding one under\n"
                    "state_dict (Lightning's .ckpt), model_state_dict or model; a prefix every key shares\n"
                    "(module., _orig_mod., Lightning's model.) is dropped when the names then fit the model.\n"
                    "Every file is checked against the model before anything is written: a file that is not a\n"
                    "state_dict or is corrupt, a missing or extra key, a tensor of another shape, or non-finite\n"
                    "parameters is an error naming the file, and nothing is left behind (with --force, the\n"
                    "existing run is replaced only once the new one is written in full).",
        epilog="The step of each snapshot is the number after step, global_step, iter or epoch in its file's\n"
               "name (epoch=0-step=100.ckpt: 100), else the last whole number (epoch1_acc0.71.pt: 1), when\n"
               "every name has one and they increase (else 0, 1, 2, ...); its time is the file's modification\n"
               "time after the first. RUN/center.pt is the last checkpoint's state_dict (buffers and frozen\n"
               "parameters included: hpcopt.load_model and hpcopt export of the final center use them).\n"
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
