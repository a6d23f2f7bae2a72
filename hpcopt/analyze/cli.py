"""The `hpcopt analyze` subcommand: flags map one to one onto AnalyzeOptions fields.

    hpcopt analyze runs/demo/trajectory.h5                      # one process
    mpirun -n 4 hpcopt analyze runs/demo/trajectory.h5          # grid points and HVPs over 4 ranks
    hpcopt analyze runs/a --compare runs/b runs/c --out cmp     # side by side in cmp/compare.html
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .options import DEVICES, PARTS, AnalyzeOptions

EXIT_INCOMPLETE = 3  # stopped by --max-points / --time-limit; run again to resume
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as the shell reports a command it interrupted


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="trajectory measures, PCA, loss landscapes, Hessian curvature and a report for a run",
        description="Analyse a recorded run: trajectory measures, PCA of the paths, loss-landscape\n"
                    "slices and interpolation barriers, Hessian eigenvalues / trace / density and\n"
                    "epsilon-sharpness; PNG figures and a self-contained report.html. Runs on one\n"
                    "process or under mpirun (grid points and Hessian-vector products are spread\n"
                    "over the ranks). An interrupted analysis resumes where it stopped.\n\n"
                    "  mpirun -n 4 hpcopt analyze runs/demo/trajectory.h5\n"
                    "  hpcopt analyze runs/a --compare runs/b --out compare",
        epilog=f"Exit status: 0 done, 2 bad input, {EXIT_INCOMPLETE} stopped early (--max-points/--time-limit), "
               f"{EXIT_INTERRUPTED} interrupted (Ctrl-C): run the same command again to resume. See docs/analyze.md.")
    p.add_argument("files", nargs="+", metavar="FILE", help="trajectory file(s) or run directories")
    p.add_argument("--compare", nargs="+", metavar="FILE", default=[],
                   help="more runs to put side by side with FILE (each is analysed into its own RUN_DIR/analysis)")
    from hpcopt.flags import add_flags, field_docs

    helps = field_docs(AnalyzeOptions)
    add_flags(p, AnalyzeOptions, flag=lambda n: "--" + n.replace("_", "-"), dest=lambda n: n, values=False, special={
        "skip": dict(default="", metavar="PARTS", help=f"comma-separated parts to leave out: {', '.join(PARTS)}"),
        "at": dict(metavar="MODEL"), "split": dict(choices=["train", "test"]),
        "device": dict(choices=list(DEVICES), metavar="{" + ",".join(DEVICES) + "}"),
        "grid": dict(default="21x21", metavar="NXxNY", help="points of a 2-D slice (default: 21x21)"),
        "plane": dict(nargs="+", default=[], metavar="MODEL", help=helps["plane"]),
        "interpolate": dict(nargs="+", default=[], metavar="A,B", help=helps["interpolate"]),
        "timeout": dict(metavar="SECONDS"), "time_limit": dict(metavar="SECONDS"), "out": dict(metavar="DIR"),
        "report": dict(help="write the PNG figures and report.html (--no-report: analysis.h5 only)"),
        "tensorboard": dict(metavar="DIR"),
    })
    p.epilog += "\nMODEL: center, center:I, init, worker:ID, worker:ID:K, or OTHER.h5#MODEL for another run."
    return p


def options_from(args) -> AnalyzeOptions:
    try:
        nx, ny = (int(v) for v in args.grid.lower().split("x"))
    except ValueError:
        raise ValueError(f"--grid must look like 21x21 (NXxNY), got {args.grid!r}") from None
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(AnalyzeOptions) if hasattr(args, f.name)}
    kw.update(grid=(nx, ny), skip=tuple(s.strip() for s in args.skip.split(",") if s.strip()),
              plane=tuple(args.plane), interpolate=tuple(args.interpolate))
    return AnalyzeOptions(**kw)


def run(args) -> int:
    """`hpcopt analyze`: collective over MPI.COMM_WORLD when launched under mpirun."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        return _interrupted()


def _interrupted() -> int:
    """Ctrl-C is how one stops an analysis that takes too long, not an error: every point done so far
    is in analysis.h5 already (store.py), so one line instead of a traceback and an MPI_Abort."""
    MPI = sys.modules.get("mpi4py.MPI")
    world = MPI.COMM_WORLD if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized() else None
    if world is None or world.rank == 0:
        print("hpcopt analyze: interrupted; run the same command again to resume", file=sys.stderr, flush=True)
    if world is not None and world.size > 1:
        # not through MPI_Finalize: it would wait for ranks that were not interrupted (they wait for
        # this one until --timeout); an exit without it makes mpirun end the job now, with this status
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


def _run(args) -> int:
    import mpi4py

    from hpcopt.launch.device import narrow_mig_early

    mpi4py.rc.thread_level = "funneled"
    narrow_mig_early()  # (as training does: a CUDA-aware MPI may start CUDA in MPI_Init)
    from mpi4py import MPI

    from hpcopt.io.inspect import TrajectoryError
    from hpcopt.launch.env import install_abort_on_error

    from .api import analyze, compare
    from .store import ResultsError

    comm = MPI.COMM_WORLD
    rank = comm.rank
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    try:
        opts = options_from(args)
    except ValueError as e:
        say_err(rank, e)
        return 2
    install_abort_on_error(comm)
    comm = comm if comm.size > 1 else None
    paths = list(args.files) + list(args.compare)
    try:
        if len(paths) > 1:
            res = compare(paths, opts, comm=comm, out=opts.out or "compare", log=say)
            if res is None:
                return 0
            for r in res["runs"]:
                _print_summary(say, r)
            say(f"comparison: {res['report']}")
            complete = all(r["complete"] for r in res["runs"])
        else:
            r = analyze(paths[0], opts, comm=comm, log=say)
            if r is None:
                return 0
            _print_summary(say, r)
            complete = r["complete"]
    except (TrajectoryError, ResultsError, ValueError) as e:  # raised alike on every rank
        say_err(rank, e)
        return 2
    if not complete:
        say("stopped early (--max-points / --time-limit): run the same command again to resume")
        return EXIT_INCOMPLETE
    return 0


def say_err(rank: int, e) -> None:
    if rank == 0:
        print(f"hpcopt analyze: error: {e}", file=sys.stderr, flush=True)


def _print_summary(say, r: dict) -> None:
    from .report import numbers

    say(f"== {r['run']['label']} ({r['seconds']:.1f} s)")
    for name, value in numbers(r):
        if name != "run":
            say(f"  {name:<40} {value}")
    say(f"  results  {r['out']}/analysis.h5")
    if "report" in r:
        say(f"  report   {r['report']}")
    if "tensorboard" in r:
        say(f"  tensorboard  {r['tensorboard']}   (tensorboard --logdir {r['tensorboard']})")
