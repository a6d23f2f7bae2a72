"""PCA of optimization paths (Li et al. 2018, section 7): the principal directions of the
snapshots' offsets from a reference point (by default the final center), the explained variance,
and every path projected on them. Pure NumPy.

As in Li et al.'s code (which calls sklearn's PCA), the offsets are mean-centred before the SVD,
but the projections are of the offsets themselves, so the reference point sits at (0, 0) of the
plane and a landscape slice through it along the same directions lines up with the paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PCA:
    origin: np.ndarray            # [P] the reference point, at coordinates 0
    components: np.ndarray        # [k, P] orthonormal principal directions
    explained: np.ndarray         # [k] explained variance ratio of each direction
    singular_values: np.ndarray   # [k]

    def project(self, points: np.ndarray) -> np.ndarray:
        """Coordinates [n, k] of points [n, P] in the plane (offsets from origin, not centred)."""
        return (np.asarray(points, dtype=np.float64) - self.origin) @ self.components.T


def fit(points: np.ndarray, origin: np.ndarray, k: int = 2) -> PCA:
    """Top-k principal directions of `points - origin` (mean-centred), with signs fixed so that
    the first point has a non-positive coordinate on each (the path runs toward +)."""
    D = np.asarray(points, dtype=np.float64) - np.asarray(origin, dtype=np.float64)
    if len(D) < 2:
        raise ValueError(f"PCA needs at least 2 snapshots, got {len(D)}")
    Dc = D - D.mean(axis=0)
    _, s, vt = np.linalg.svd(Dc, full_matrices=False)
    k = min(k, len(s))
    comps = vt[:k].copy()
    first = D[0] @ comps.T
    comps[first > 0] *= -1
    total = float((s ** 2).sum())
    explained = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    return PCA(origin=np.asarray(origin, dtype=np.float64), components=comps, explained=explained,
               singular_values=s[:k].copy())


def run_pca(run, k: int = 2, with_workers: bool = True) -> tuple[PCA, dict]:
    """PCA of one run's center path (and worker snapshots) around its final center; returns the
    fit and the projected paths {'center': [n, k], 'worker:ID': [m, k]}."""
    pts = [run.center]
    if with_workers and len(run.workers):
        pts.append(run.workers)
    p = fit(np.concatenate(pts), run.center[-1], k)
    paths = {"center": p.project(run.center)}
    for w in sorted({int(w) for w in run.workers_meta["worker_id"]}) if len(run.workers_meta) else []:
        paths[f"worker:{w}"] = p.project(run.workers[run.workers_meta["worker_id"] == w])
    return p, paths


def shared_pca(runs: list, k: int = 2) -> tuple[PCA, dict]:
    """One plane for several runs of the same model: PCA of every run's center path around the
    first run's final center; returns the fit and {run label: projected center path}."""
    sizes = {r.n_parameters for r in runs}
    if len(sizes) != 1:
        raise ValueError(f"runs have different parameter counts {sorted(sizes)}; a shared plane needs one model")
    p = fit(np.concatenate([r.center for r in runs]), runs[0].center[-1], k)
    return p, {r.label: p.project(r.center) for r in runs}
