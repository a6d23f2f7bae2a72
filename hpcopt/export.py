"""The trained model out of a run: any saved model of its trajectory as the run's `nn.Module`, or
as a PyTorch state_dict file (`hpcopt export`, and OUT/center.pt when a training ends).

    hpcopt export runs/demo -o model.pt                     # the final center
    hpcopt export runs/demo --at worker:2 -o w2.safetensors
    model = hpcopt.load_model("runs/demo")                  # nn.Module in eval mode, ready for model(x)

The model is rebuilt from the config the run recorded (as `hpcopt analyze` does: a user's factory
must be importable) and takes the saved model's flat parameters (hpcopt.analyze.source.point
names and reads them). A trajectory records trainable parameters only: buffers (BatchNorm's
running statistics) and frozen parameters keep the values the model is built with under the
run's seed, as in the center that training evaluates; except in the final center of a run
hpcopt.Recorder recorded or hpcopt import wrote, which takes them from OUT/center.pt (the
model's full state_dict at close(), or the last checkpoint's).
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np

SAFETENSORS = ".safetensors"


class ExportError(ValueError):
    """The saved model cannot be exported as asked; the message says why and what there is."""


def load_model(run, at: str = "center"):
    """The run's model with the parameters of its saved model `at`, on the CPU in eval mode.

    `run`: a run directory or its trajectory.h5. `at`: `center` (the last center snapshot: after
    a finished training, the final center), `center:I` (center snapshot row I, negative from the
    end), `worker:ID` (that worker's last recorded snapshot), also `init` and `worker:ID:K`."""
    from hpcopt.analyze.source import load_run, point

    if "#" in at:
        raise ExportError(f"model {at!r} names a model of another run: export from that run instead")
    try:
        recorded = load_run(run)
        _, vector = point(recorded, at)
    except ValueError as e:  # TrajectoryError too: missing, foreign or damaged file
        raise ExportError(str(e)) from None
    model = module_at(recorded.config, recorded.layout, vector)
    if at.split(":")[0] == "center" and np.array_equal(vector, recorded.center[-1]):
        _final_state(model, Path(recorded.path).parent / "center.pt")
    return model


def _final_state(model, center_pt: Path) -> None:
    """The final center of a recorded or imported run: its buffers and frozen parameters, which
    the trajectory does not hold, from OUT/center.pt (the full state_dict the Recorder saved at
    close, or the last checkpoint an import read), when that file's trainable parameters are
    this model's exactly (it belongs to this center, not to an earlier end of the run). For
    hpcopt's own runs the file holds the values the model is built with: nothing changes."""
    import torch

    try:
        state = torch.load(center_pt, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return
    except Exception:  # unreadable: the model stays as rebuilt from the trajectory
        return
    current = model.state_dict()
    if not isinstance(state, dict) or set(state) != set(current):
        return
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for k in current:
        v = state[k]
        if not isinstance(v, torch.Tensor) or v.shape != current[k].shape:
            return
        if k in trainable and not torch.equal(v.to(current[k].dtype), current[k]):
            return
    with torch.no_grad():
        for k, v in current.items():
            if k not in trainable:
                v.copy_(state[k])


def module_at(config, layout: dict, vector):
    """The model of `config` (hpcopt.config.Config), float32 on the CPU in eval mode, with the flat
    `vector` as its trainable parameters, laid out as `layout` (names, shapes, offsets, as
    hpcopt.models.FlatModel.layout gives them). A model that is built differently now (its factory
    changed) is an ExportError naming both."""
    import torch

    from hpcopt.models import build_model

    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random numbers stay as they were
            torch.manual_seed(config.run.seed)  # as training seeds it before building the model
            model = build_model(config.model.name, config.model.kwargs).to(torch.float32)
    except ValueError as e:
        raise ExportError(str(e)) from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    built = [(n, list(p.shape)) for n, p in params.items()]
    recorded = [(n, list(s)) for n, s in zip(layout["names"], layout["shapes"])]
    if built != recorded or sum(p.numel() for p in params.values()) != len(vector):
        raise ExportError(f"model {config.model.name} is built now with the parameters {_names(built)}, but the "
                          f"run recorded {_names(recorded)} ({len(vector):,} numbers): has the model changed since?")
    with torch.no_grad():
        for p, offset in zip(params.values(), layout["offsets"]):
            p.copy_(torch.from_numpy(vector[offset:offset + p.numel()]).view_as(p))
    return model.eval()


def _names(layout: list) -> str:
    if not layout:
        return "(none trainable)"
    shown = ", ".join(f"{n} {tuple(s)}" for n, s in layout[:4])
    return shown + (f" and {len(layout) - 4} more" if len(layout) > 4 else "")


def state_dict_of(model) -> dict:
    """The module's state_dict as tensors of their own (CPU, contiguous), as safetensors wants
    them (tied weights become two equal tensors; load_state_dict ties them again)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def check_writable(path) -> None:
    """Before any work: the file's folder must exist, and a .safetensors name needs the
    safetensors package."""
    if not str(path).strip():
        raise ExportError("the output file name is empty: name the file to write, e.g. -o model.pt")
    if Path(path).is_dir():
        raise ExportError(f"cannot write {path}: it is a directory; name a file in it, e.g. {Path(path) / 'model.pt'}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise ExportError(f"cannot write {path}: no such directory {folder}")
    if Path(path).suffix == SAFETENSORS and importlib.util.find_spec("safetensors") is None:
        raise ExportError(f"{path}: writing safetensors needs the safetensors package, which is not installed: "
                          f"`pip install safetensors` (into this Python's environment), or write a .pt file")


def check_not_run_file(run, path) -> None:
    """Refuse to write over a file of the run being exported (its trajectory, checkpoint, config,
    status, center.pt, ... or anything in its workers/ and joins/), also through a symlink."""
    from hpcopt.io.rundir import RunDir

    src = Path(run)
    rd = RunDir(src if src.is_dir() else src.parent)
    target = Path(path).resolve()
    own = {Path(p).resolve() for p in (src, rd.trajectory, rd.config, rd.token, rd.server_uri, rd.join_info,
                                       rd.status, rd.checkpoint, rd.checkpoint_sums, rd.center_model, rd.lock_file,
                                       rd.path / "data.npz")}
    inside = any(target.is_relative_to(d.resolve()) for d in (rd.workers, rd.joins))
    if target in own or inside:
        raise ExportError(f"{path} is a file of the run {rd.path} itself: writing it would destroy the run; "
                          f"choose another file name, e.g. {rd.path / 'model.pt'}")


def save_state_dict(state: dict, path) -> None:
    """Write `state` to `path` atomically (never half a file): the safetensors format for a
    .safetensors name, torch.save's for any other."""
    from hpcopt.io.rundir import write_atomic

    check_writable(path)
    if Path(path).suffix == SAFETENSORS:
        from safetensors.torch import save

        data = save(state, metadata={"format": "pt"})
    else:
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    write_atomic(Path(path), data)


def export(run, at: str, out):
    """`hpcopt export`: the saved model `at` of `run` as a state_dict file `out`. Returns the model."""
    check_writable(out)
    check_not_run_file(run, out)
    model = load_model(run, at)
    save_state_dict(state_dict_of(model), out)
    return model


def save_center(path, config, layout: dict, center) -> None:
    """OUT/center.pt when a training ends: the final center as a state_dict, the same file
    `hpcopt export OUT --at center` writes then."""
    save_state_dict(state_dict_of(module_at(config, layout, center)), path)
