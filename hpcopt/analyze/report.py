"""Figures (PNG, matplotlib) and one self-contained HTML report (figures embedded) from the
results of `analyze()`; `write_compare` puts several runs side by side. Plotting only: every
number shown was computed elsewhere.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

CMAP = "viridis"


def _subplots(*grid, figsize):
    """A figure and its axes, as plt.subplots gives them, but without pyplot: no backend is
    chosen or changed (a notebook keeps its own) and nothing stays registered after use."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def _save(fig, out: Path, name: str, paths: list) -> None:
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    paths.append(path)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _contour(ax, xs, ys, loss, title, levels=30):
    Z = np.log10(np.clip(loss, 1e-12, None))
    finite = np.isfinite(Z)
    if finite.sum() < 4:
        ax.text(0.5, 0.5, "not computed yet", ha="center", transform=ax.transAxes)
        return None
    X, Y = np.meshgrid(xs, ys)
    cs = ax.contourf(X, Y, np.where(finite, Z, np.nan), levels=levels, cmap=CMAP)
    ax.contour(X, Y, np.where(finite, Z, np.nan), levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    ax.set_title(title)
    return cs


def figures(results: dict) -> dict:
    """Every figure of one run's results (what hpcopt.analyze.analyze returns) as matplotlib
    Figures, by name (curves, trajectory, layers, pca, landscape_random, plane, interpolation,
    hessian: those the results have). In a notebook they display as they are; fig.savefig
    writes one. Points of a grid already in the run's analysis.h5 are read, not computed again:

        from hpcopt.analyze import AnalyzeOptions, analyze
        figs = hpcopt.figures(analyze("runs/mine", AnalyzeOptions(report=False))); figs["hessian"]
    """
    figs: dict = {}
    label = results["run"]["label"]
    tr = results.get("trajectory")
    curves = results.get("curves")
    if curves is not None:
        fig, axes = _subplots(1, 2, figsize=(11, 3.8))
        ax = axes[0]
        for w, (t, loss) in sorted(curves["train_loss"].items()):
            ax.plot(t, loss, lw=0.7, alpha=0.6, label=f"worker {w} train")
        if len(curves["eval_time"]):
            ax.plot(curves["eval_time"], curves["test_loss"], "k-o", ms=3, lw=1.6, label="center test")
        ax.set_yscale("log")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("loss")
        ax.set_title(f"{label}: loss")
        ax.legend(fontsize=7)
        ax = axes[1]
        if len(curves["eval_time"]):
            ax.plot(curves["eval_time"], 100 * np.asarray(curves["test_accuracy"]), "k-o", ms=3)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("center test accuracy (%)")
        ax.set_title(f"{label}: test accuracy")
        ax.grid(alpha=0.3)
        figs["curves"] = fig
    if tr is not None:
        fig, axes = _subplots(1, 3, figsize=(15, 3.8))
        ax = axes[0]
        for w, (t, d) in sorted(tr["distance_to_center"].items()):
            ax.plot(t, d, lw=0.8, alpha=0.7, label=f"worker {w}")
        if len(tr["spread"]):
            ax.plot(tr["spread_time"], tr["spread"], "k", lw=1.8, label="mean (spread)")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no worker snapshots recorded", ha="center", transform=ax.transAxes)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("||x_i - center||")
        ax.set_title("distance of each worker to the center")
        ax = axes[1]
        ax.plot(tr["center_time"], tr["center_distance_from_init"], label="distance from init")
        ax.plot(tr["center_time"], tr["center_path_length"], label="distance travelled")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("parameter distance")
        ax.set_title("center: travelled vs net displacement")
        ax.legend(fontsize=8)
        ax = axes[2]
        t, n = tr["membership"]
        ax.step(t, n, where="post")
        ax.set_ylim(-0.2, max(1, n.max()) + 0.5)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("active workers")
        ax.set_title("membership")
        figs["trajectory"] = fig

        layers = tr["per_layer"]
        fig, ax = _subplots(figsize=(max(6, 0.8 * len(layers) + 2), 3.8))
        names = [l["name"] for l in layers]
        xpos = np.arange(len(layers))
        rel = [l["displacement"] / max(l["norm_start"], 1e-12) for l in layers]
        ratio = [l["path_length"] / max(l["displacement"], 1e-12) for l in layers]
        ax.bar(xpos - 0.2, rel, 0.4, label="net displacement / initial norm")
        ax.bar(xpos + 0.2, ratio, 0.4, label="distance travelled / net displacement")
        ax.set_xticks(xpos, names, rotation=30, ha="right", fontsize=8)
        if min(rel + ratio) > 0:
            ax.set_yscale("log")
        ax.set_title("center, per layer")
        ax.legend(fontsize=8)
        figs["layers"] = fig

    grids = results.get("grids", {})
    pca = results.get("pca")
    if pca is not None:
        fit, paths = pca["fit"], pca["paths"]
        fig, ax = _subplots(figsize=(6.2, 5.2))
        g = grids.get("pca_2d")
        if g is not None:
            cs = _contour(ax, g["x"], g["y"], g["loss"], "")
            if cs is not None:
                fig.colorbar(cs, ax=ax, label="log10 loss")
        _draw_paths(ax, paths)
        ax.set_xlabel(f"PC1 ({100 * fit.explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * fit.explained[1]:.1f}% of variance)" if len(fit.explained) > 1 else "PC2")
        ax.set_title(f"{label}: paths on their top-2 PCA plane" + (" over the loss" if g is not None else ""))
        ax.legend(fontsize=7, loc="best")
        figs["pca"] = fig

    if "random_1d" in grids or "random_2d" in grids:
        fig, axes = _subplots(1, 2, figsize=(11.5, 4.4))
        g = grids.get("random_1d")
        if g is not None:
            ax = axes[0]
            ax.plot(g["x"], g["loss"], "b-", label="loss")
            ax.set_yscale("log")
            ax.set_xlabel("alpha (along a filter-normalised direction)")
            ax.set_ylabel("loss", color="b")
            if np.isfinite(g["accuracy"]).any():
                ax2 = ax.twinx()
                ax2.plot(g["x"], 100 * g["accuracy"], "r--", label="accuracy")
                ax2.set_ylabel("accuracy (%)", color="r")
            ax.set_title(f"1-D slice at {g['spec'].get('at')} ({g['spec'].get('split')} set)")
        g = grids.get("random_2d")
        if g is not None:
            cs = _contour(axes[1], g["x"], g["y"], g["loss"], "2-D slice, filter-normalised directions")
            if cs is not None:
                fig.colorbar(cs, ax=axes[1], label="log10 loss")
            axes[1].plot([0], [0], "r*", ms=10)
            axes[1].set_xlabel("delta")
            axes[1].set_ylabel("eta")
        figs["landscape_random"] = fig

    g = grids.get("plane")
    if g is not None:
        fig, ax = _subplots(figsize=(6.2, 5.2))
        models = g["spec"].get("models", [])
        if g["y"] is None:
            ax.plot(g["x"], g["loss"])
            ax.set_yscale("log")
            ax.set_xlabel(f"0 = {models[0]}, 1 = {models[1]}")
        else:
            cs = _contour(ax, g["x"], g["y"], g["loss"], "slice through saved models")
            if cs is not None:
                fig.colorbar(cs, ax=ax, label="log10 loss")
            for (px, py), name in zip([(0, 0), (1, 0), (0, 1)], models):
                ax.plot(px, py, "r*", ms=10)
                ax.annotate(name, (px, py), textcoords="offset points", xytext=(5, 5), color="w", fontsize=8)
        figs["plane"] = fig

    interps = [(k, g) for k, g in grids.items() if k.startswith("interp_")]
    if interps:
        fig, axes = _subplots(1, 2, figsize=(11.5, 4))
        for k, g in interps:
            b = g.get("barrier")
            lab = f"{g['spec']['a']} -> {g['spec']['b']}" + (f" (barrier {b['barrier']:.3g})" if b else "")
            axes[0].plot(g["x"], g["loss"], label=lab)
            if np.isfinite(g["accuracy"]).any():
                axes[1].plot(g["x"], 100 * g["accuracy"], label=lab)
        for ax in axes:
            ax.axvline(0, color="grey", lw=0.5)
            ax.axvline(1, color="grey", lw=0.5)
            ax.set_xlabel("t   ((1 - t) A + t B)")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("loss")
        axes[0].legend(fontsize=7)
        axes[0].set_title("linear interpolation")
        axes[1].set_ylabel("accuracy (%)")
        figs["interpolation"] = fig

    cv = results.get("curvature")
    if cv is not None and ("eigenvalues" in cv or "density" in cv):
        n = 1 + ("density" in cv) + ("trace_samples" in cv)
        fig, axes = _subplots(1, n, figsize=(5.2 * n, 3.8))
        axes = np.atleast_1d(axes)
        i = 0
        if "eigenvalues" in cv:
            ev = cv["eigenvalues"]
            axes[0].bar(np.arange(1, len(ev) + 1), ev, yerr=cv["eigen_residuals"], capsize=3)
            axes[0].set_xlabel("k")
            axes[0].set_ylabel("eigenvalue")
            axes[0].set_title("top Hessian eigenvalues (Lanczos)")
            i = 1
        if "trace_samples" in cv:
            s = cv["trace_samples"]
            n_ = np.arange(1, len(s) + 1)
            mean = np.cumsum(s) / n_
            se = np.array([np.std(s[:k], ddof=1) / math.sqrt(k) if k > 1 else np.nan for k in n_])
            ax = axes[i]
            ax.plot(n_, mean, label="running estimate")
            ax.fill_between(n_, mean - se, mean + se, alpha=0.3, label="+- standard error")
            ax.set_xlabel("probes")
            ax.set_ylabel("trace")
            ax.set_title(f"Hutchinson trace: {cv['trace']:.4g} +- {cv['trace_stderr']:.2g}")
            ax.legend(fontsize=8)
            i += 1
        if "density" in cv:
            d = cv["density"]
            ax = axes[i]
            ax.semilogy(d["grid"], np.maximum(d["density"], 1e-12))
            ax.set_ylim(bottom=max(1e-8, d["density"].max() * 1e-7))
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density")
            ax.set_title("Hessian spectral density (SLQ)")
        figs["hessian"] = fig
    for fig in figs.values():
        fig.tight_layout()
    return figs


def figures_for(results: dict, out: Path) -> list[Path]:
    """Every figure of one run's results as PNG files in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, fig in figures(results).items():
        _save(fig, out, f"{name}.png", paths)
    return paths


def _draw_paths(ax, paths: dict) -> None:
    c = paths["center"]
    for k, p in paths.items():
        if k == "center" or not len(p):
            continue
        ax.plot(p[:, 0], p[:, 1], ".", ms=3, alpha=0.6, label=k.replace("worker:", "worker "))
    ax.plot(c[:, 0], c[:, 1], "w-", lw=2.2)
    ax.plot(c[:, 0], c[:, 1], "r-", lw=1.2, label="center")
    ax.plot(c[0, 0], c[0, 1], "ko", ms=6, label="init")
    ax.plot(c[-1, 0], c[-1, 1], "r*", ms=12, label="final center")


def numbers(results: dict) -> list[tuple[str, str]]:
    """(name, value) rows of the report's table."""
    r = results["run"]
    rows = [("run", r["path"]), ("method", r["method"]), ("status", r["status"]), ("parameters", f"{r['parameters']:,}"),
            ("workers", str(len(r["workers"]))), ("exchanges", f"{r['exchanges']:,}"),
            ("final center test accuracy", f"{100 * r['final_test_accuracy']:.2f}%" if math.isfinite(r["final_test_accuracy"]) else "n/a"),
            ("final center test loss", _fmt(r["final_test_loss"]))]
    tr = results.get("trajectory")
    if tr is not None:
        rows += [("center distance travelled", _fmt(tr["center_path_length"][-1])),
                 ("center net displacement", _fmt(tr["center_displacement"]))]
        for w, v in tr["workers"].items():
            rows.append((f"worker {w}: travelled / displacement / final distance to center",
                         f"{_fmt(v['path_length'])} / {_fmt(v['displacement'])} / {_fmt(v['final_distance_to_center'])}"))
    pca = results.get("pca")
    if pca is not None:
        rows.append(("PCA explained variance (PC1, PC2)", ", ".join(f"{100 * e:.1f}%" for e in pca["fit"].explained)))
    for k, g in results.get("grids", {}).items():
        if "barrier" in g:
            b = g["barrier"]
            rows.append((f"barrier {g['spec']['a']} -> {g['spec']['b']} (above the chord / above both ends)",
                         f"{_fmt(b['barrier'])} / {_fmt(b['barrier_over_endpoints'])}"))
        if not g["done"].all():
            rows.append((f"grid {k}", f"{int(g['done'].sum())} of {g['done'].size} points done (run again to resume)"))
    cv = results.get("curvature")
    if cv is not None:
        d = cv["depends_on"]
        where = f"at {d['at']}, {d['samples']} {d['split']} samples (subsample seed {d['subsample_seed']})"
        if "eigenvalues" in cv:
            rows.append(("top Hessian eigenvalues", ", ".join(_fmt(v, 5) for v in cv["eigenvalues"]) + f"  ({where})"))
            rows.append(("Hessian trace (Hutchinson)", (f"{_fmt(cv['trace'], 5)} +- {_fmt(cv['trace_stderr'], 2)} "
                         f"({cv['trace_probes']} probes)")))
        if "sharpness" in cv:
            s = cv["sharpness"]
            rows.append((f"epsilon-sharpness (eps={s['epsilon']:g})", _fmt(s["value"])))
    return rows


def tensorboard_scalars(results: dict) -> list[tuple[str, int, float]]:
    """(tag, step, value) of the numbers TensorBoard gets (`--tensorboard`): the trajectory
    measures along the center's exchange count (the training's steps), and the single numbers at
    the last center snapshot's count."""
    out: list[tuple[str, int, float]] = []
    tr = results.get("trajectory")
    last = 0
    if tr is not None and len(tr["center_exchanges"]):
        ex = np.asarray(tr["center_exchanges"])
        last = int(ex[-1])
        for n, d, length in zip(ex, tr["center_distance_from_init"], tr["center_path_length"]):
            out += [("analysis/center_distance_from_init", int(n), float(d)),
                    ("analysis/center_path_length", int(n), float(length))]
        # the spread is measured at worker snapshot times: on the exchange axis through the center's clock
        at = np.interp(tr["spread_time"], tr["center_time"], ex)
        out += [("analysis/spread", int(round(n)), float(v)) for n, v in zip(at, tr["spread"])]
    pca = results.get("pca")
    if pca is not None:
        out += [(f"analysis/pca_explained_variance/pc{i + 1}", last, float(e)) for i, e in enumerate(pca["fit"].explained)]
    for k, g in results.get("grids", {}).items():
        if "barrier" in g:
            out.append((f"analysis/barrier/{k}", last, float(g["barrier"]["barrier"])))
    cv = results.get("curvature") or {}
    if "eigenvalues" in cv:
        out += [("analysis/hessian/top_eigenvalue", last, float(cv["eigenvalues"][0])),
                ("analysis/hessian/trace", last, float(cv["trace"]))]
    if "sharpness" in cv:
        out.append(("analysis/sharpness", last, float(cv["sharpness"]["value"])))
    return out


def _html(title: str, rows: list, figures: list[Path], notes: str = "") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             ("<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "img{max-width:100%;margin:8px 0}</style></head><body>"),
             f"<h1>{html.escape(title)}</h1>", notes, "<table>"]
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    for p in figures:
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(p.stem)}</h3><img alt='{html.escape(p.name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict, out: Path) -> str:
    """Figures plus OUT/report.html; returns the report's path."""
    out = Path(out)
    figs = figures_for(results, out)
    page = _html(f"hpcopt analyze: {results['run']['label']}", numbers(results), figs,
                 "<p>Numbers and arrays are also in analysis.h5 next to this file.</p>")
    path = out / "report.html"
    path.write_text(page)
    return str(path)


def write_compare(all_results: list[dict], out: Path, shared=None) -> str:
    """Runs side by side: curves overlaid, paths on a shared PCA plane, curvature vs test
    accuracy, one table. `shared` is (fit, {label: projected center path}) or None."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs: list[Path] = []
    fig, axes = _subplots(1, 3, figsize=(16, 4))
    for k, r in enumerate(all_results):  # one colour per run in every panel
        lab, color = r["run"]["label"], f"C{k % 10}"
        c = r.get("curves")
        if c is not None and len(c["eval_time"]):
            # markers: a run evaluated once is one point, which a line alone does not draw
            axes[0].plot(c["eval_time"], c["test_loss"], "-o", ms=3, color=color, label=lab)
            axes[1].plot(c["eval_time"], 100 * np.asarray(c["test_accuracy"]), "-o", ms=3, color=color, label=lab)
        t = r.get("trajectory")
        if t is not None and len(t["spread"]):
            axes[2].plot(t["spread_time"], t["spread"], "-o", ms=3, color=color, label=lab)
    axes[0].set_yscale("log")
    for ax, yl in zip(axes, ("center test loss", "center test accuracy (%)", "mean distance worker-center")):
        ax.set_xlabel("time (s)")
        ax.set_ylabel(yl)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, out, "compare_curves.png", figs)
    if shared is not None:
        fit, paths = shared
        fig, ax = _subplots(figsize=(6.2, 5.2))
        for k, (lab, p) in enumerate(paths.items()):
            line, = ax.plot(p[:, 0], p[:, 1], "-", color=f"C{k % 10}", label=lab)
            ax.plot(p[-1, 0], p[-1, 1], "*", ms=11, color=line.get_color())
            ax.plot(p[0, 0], p[0, 1], "o", ms=5, color=line.get_color())
        ax.set_xlabel(f"PC1 ({100 * fit.explained[0]:.1f}%)")
        ax.set_ylabel(f"PC2 ({100 * fit.explained[1]:.1f}%)" if len(fit.explained) > 1 else "PC2")
        ax.set_title("center paths on one shared PCA plane (o start, * end)")
        ax.legend(fontsize=8)
        _save(fig, out, "compare_pca.png", figs)
    with_cv = [r for r in all_results if r.get("curvature") and "eigenvalues" in r["curvature"]]
    if with_cv:
        fig, axes = _subplots(1, 2, figsize=(11, 4))
        for k, r in enumerate(all_results):
            if not (r.get("curvature") and "eigenvalues" in r["curvature"]):
                continue
            acc = 100 * r["run"]["final_test_accuracy"]
            cv, color = r["curvature"], f"C{k % 10}"
            axes[0].plot(cv["eigenvalues"][0], acc, "o", ms=8, color=color, label=r["run"]["label"])
            axes[1].errorbar(cv["trace"], acc, xerr=cv["trace_stderr"], fmt="o", ms=8, color=color,
                             label=r["run"]["label"])
        axes[0].set_xlabel("top Hessian eigenvalue")
        axes[1].set_xlabel("Hessian trace")
        for ax in axes:
            ax.set_ylabel("final center test accuracy (%)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        _save(fig, out, "compare_sharpness.png", figs)
    rows = [("run", "method", "test accuracy", "top eigenvalue", "trace (+- s.e.)", "eps-sharpness", "center travelled")]
    for r in all_results:
        cv = r.get("curvature") or {}
        t = r.get("trajectory")
        rows.append((r["run"]["label"], r["run"]["method"],
                     f"{100 * r['run']['final_test_accuracy']:.2f}%" if math.isfinite(r["run"]["final_test_accuracy"]) else "n/a",
                     _fmt(cv["eigenvalues"][0]) if "eigenvalues" in cv else "-",
                     f"{_fmt(cv['trace'])} +- {_fmt(cv['trace_stderr'], 2)}" if "trace" in cv else "-",
                     _fmt(cv["sharpness"]["value"]) if "sharpness" in cv else "-",
                     _fmt(t["center_path_length"][-1]) if t is not None else "-"))
    page = _html("hpcopt analyze: comparison", rows, figs,
                 "<p>Each run's own report is in its analysis directory.</p>")
    path = out / "compare.html"
    path.write_text(page)
    return str(path)
