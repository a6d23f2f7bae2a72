"""Options of `hpcopt analyze` (and of the Python API): one keyword-only dataclass whose field
docstrings are also the command line's help. No torch import here, so `hpcopt --help` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")
PARTS = ("trajectory", "pca", "landscape", "interpolation", "hessian", "sharpness", "density")


@dataclass(kw_only=True)
class AnalyzeOptions:
    out: str | None = None
    """directory for analysis.h5, the figures and report.html (default: RUN_DIR/analysis)"""
    skip: tuple = ()
    """parts to leave out, from: trajectory, pca, landscape, interpolation, hessian, sharpness, density"""
    density: bool = False
    """also estimate the Hessian's spectral density (stochastic Lanczos quadrature; slower)"""
    at: str = "center"
    """the model the landscape slices and the curvature are taken at"""
    split: str = "train"
    """data the loss is measured on: train or test"""
    samples: int = 0
    """landscape and interpolation points: evaluate on this fixed subsample (0: the whole split)"""
    seed: int = 0
    """seed of random directions, subsamples and random probe vectors"""
    grid: tuple = (21, 21)
    """points of a 2-D slice along x and y"""
    span: float = 1.0
    """random filter-normalised slices cover [-span, span] along each direction"""
    line_points: int = 41
    """points of the 1-D random slice"""
    plane: tuple = ()
    """two or three saved models: a slice through them (the first at (0, 0), the others at (1, 0) and (0, 1))"""
    interpolate: tuple = ()
    """pairs 'A,B' of saved models to interpolate between (default: init,center and center,worker:ID for each worker)"""
    interp_points: int = 31
    """points on each interpolation line, t from -0.25 to 1.25"""
    curvature_samples: int = 1000
    """Hessian and sharpness: a fixed subsample of this many samples of the split (0: all)"""
    top_k: int = 5
    """number of top Hessian eigenvalues"""
    lanczos_steps: int = 0
    """Lanczos iterations for the eigenvalues (0: max(3 top_k, 30))"""
    trace_rtol: float = 0.02
    """Hutchinson stops when its standard error is at most this fraction of the estimate"""
    trace_max_probes: int = 300
    """Hutchinson stops after this many probe vectors at the latest"""
    density_runs: int = 3
    """stochastic Lanczos quadrature: number of random starts"""
    density_steps: int = 60
    """stochastic Lanczos quadrature: Lanczos steps per start"""
    sharpness_eps: float = 1e-3
    """epsilon of epsilon-sharpness (box |z_i| <= eps (|x_i| + 1))"""
    sharpness_steps: int = 20
    """ascent steps of epsilon-sharpness"""
    batch: int = 1000
    """samples per forward/backward pass"""
    timeout: float = 120.0
    """seconds any wait on another rank may last before the analysis fails with a clear error"""
    max_points: int = 0
    """compute at most this many new grid points, then stop (a later run resumes; 0: no limit)"""
    time_limit: float = 0.0
    """stop handing out grid points after this many seconds (a later run resumes; 0: no limit)"""
    threads: int = 1
    """torch threads per rank"""
    device: str = "auto"
    """what each rank computes on: auto (its node-local rank's GPU when CUDA is available, else the CPU), cpu or cuda"""
    progress: bool | None = None
    """progress bars with ETA on stderr (default: when stderr is a terminal)"""
    report: bool = True
    """write the PNG figures and report.html"""
    tensorboard: str | None = None
    """also write the analysis's numbers as TensorBoard event files to this directory, e.g. RUN_DIR/tensorboard next to the training's (with --compare one subdirectory per run; needs pip install 'hpcopt[tensorboard]')"""

    def __post_init__(self):
        bad = [p for p in self.skip if p not in PARTS]
        if bad:
            raise ValueError(f"unknown part(s) to skip: {', '.join(bad)}; parts are {', '.join(PARTS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be {', '.join(DEVICES)}, got {self.device!r}")
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {self.split!r}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be two positive sizes NXxNY, got {self.grid!r}")
        if self.plane and len(self.plane) not in (2, 3):
            raise ValueError(f"plane takes 2 or 3 models, got {len(self.plane)}")
        for pair in self.interpolate:
            if len(pair.split(",")) != 2:
                raise ValueError(f"interpolate takes pairs 'A,B', got {pair!r}")
        for name in ("line_points", "interp_points", "top_k", "threads", "batch", "density_runs", "density_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for f in fields(self):  # no option takes NaN or infinity (time_limit's "no limit" is 0)
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
                raise ValueError(f"{f.name} must fit in 64 bits, got {v}")
        if self.timeout <= 0 or self.span <= 0 or self.sharpness_eps <= 0 or self.trace_rtol <= 0:
            raise ValueError("timeout, span, sharpness_eps and trace_rtol must be > 0")
        for name in ("samples", "seed", "max_points", "time_limit", "lanczos_steps", "curvature_samples",
                     "trace_max_probes", "sharpness_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def wants(self, part: str) -> bool:
        if part == "density":
            return self.density and part not in self.skip
        return part not in self.skip


def out_dir(path: str, opts: AnalyzeOptions) -> Path:
    if opts.out:
        return Path(opts.out)
    p = Path(path)
    return (p if p.is_dir() else p.parent) / "analysis"
