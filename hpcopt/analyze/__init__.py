"""`hpcopt analyze`: trajectory measures, PCA of paths, loss-landscape slices, interpolation
barriers and curvature (Hessian eigenvalues, trace, spectral density, epsilon-sharpness) of a
recorded run, in parallel over MPI ranks, with figures and an HTML report. See docs/analyze.md.

    mpirun -n 4 hpcopt analyze runs/demo/trajectory.h5
    hpcopt analyze runs/a runs/b --compare      # side by side

Layout: pure math on flat vectors (trajectory, pca, landscape, curvature, objective), MPI
distribution (parallel), the results file (store), figures and HTML (report), orchestration
and Python API (api), the command line (cli).
"""

from .options import PARTS, AnalyzeOptions  # noqa: F401


def __getattr__(name):  # the API imports torch: only when it is used
    if name in ("analyze", "compare"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
