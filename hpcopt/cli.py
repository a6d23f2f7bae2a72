"""The `hpcopt` command.

    mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/mine
    hpcopt inspect runs/mine/trajectory.h5 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from hpcopt import __version__


def _train_parser(sub) -> argparse.ArgumentParser:
    from hpcopt.config import fields_for_cli

    p = sub.add_parser(
        "train", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train with asynchronous EASGD/EAMSGD (run under mpirun or srun)",
        description="Train with asynchronous elastic averaging. Ranks 0..S-1 hold the center\n"
                    "(S = run.servers), all other ranks are workers.\n\n"
                    "  mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/mine\n\n"
                    "Every config field can be overridden with --section.key VALUE.",
        epilog="The trajectory goes to OUT/trajectory.h5; read it with `hpcopt inspect`.")
    p.add_argument("--config", "-c", metavar="TOML", help="config file (default: the built-in defaults)")
    p.add_argument("--out", "-o", metavar="DIR", help="run directory (same as --run.out)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT/trajectory.h5")
    groups = {}
    for section, name, kind, default, doc in fields_for_cli():
        if section not in groups:
            groups[section] = p.add_argument_group(f"[{section}]")
        metavar = {"int": "N", "float": "X", "bool": "BOOL", "dict": "JSON"}.get(kind, "STR")
        groups[section].add_argument(f"--{section}.{name}", dest=f"set:{section}.{name}", metavar=metavar,
                                     default=argparse.SUPPRESS, help=f"{doc} (default: {default!r})")
    return p


def _cmd_train(args) -> int:
    import mpi4py

    # Only the main thread calls MPI (the evaluator thread runs torch only).
    mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    from hpcopt import config as C
    from hpcopt.launch.env import install_abort_on_error
    from hpcopt.train import UsageError, train

    rank = MPI.COMM_WORLD.rank
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set:")}
    if args.out:
        overrides["run.out"] = args.out
    try:
        cfg = C.load(args.config, overrides)
    except C.ConfigError as e:  # the same on every rank: report once, exit cleanly
        if rank == 0:
            print(f"hpcopt train: config error: {e}", file=sys.stderr)
        return 2
    install_abort_on_error(MPI.COMM_WORLD)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    try:
        summary = train(cfg, force=args.force, log=log)
    except UsageError as e:
        if rank == 0:
            print(f"hpcopt train: error: {e}", file=sys.stderr)
        return 2
    if summary is not None and "path" in summary:
        acc = summary["final_center_test_accuracy"]
        if "rounds" in summary:
            what = f"{summary['rounds']} synchronous rounds"
            who = "average"
        else:
            what = f"{summary['exchanges']} exchanges"
            who = "center"
        log(f"done: {what} in {summary['wall_seconds']:.1f} s; final {who} test accuracy {100 * acc:.2f}%")
        if "cpu_seconds" in summary:
            log(f"server 0 used {summary['cpu_seconds']:.1f} s of CPU ({summary['polls']} polls)")
        log(f"trajectory: {summary['path']}   (see it with: hpcopt inspect {summary['path']})")
    return 0


def _cmd_inspect(args) -> int:
    from hpcopt.io.inspect import TrajectoryError, format_summary, summarize

    try:
        s = summarize(args.file)
    except TrajectoryError as e:
        print(f"hpcopt inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=None if args.json else 2) if args.json else format_summary(s))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hpcopt", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Asynchronous elastic-averaging training (EASGD/EAMSGD) under MPI, with the\n"
                    "optimization trajectory recorded to one parallel HDF5 file.",
        epilog="Quick start:\n"
               "  mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/mine\n"
               "  hpcopt inspect runs/mine/trajectory.h5")
    parser.add_argument("--version", action="version", version=f"hpcopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    p = sub.add_parser("inspect", help="summarize a trajectory file",
                       description="Print a summary of a trajectory file (or a run directory).")
    p.add_argument("file", help="OUT/trajectory.h5 or the run directory OUT")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    from hpcopt.analyze.cli import add_parser as _analyze_parser

    _analyze_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "analyze":
        from hpcopt.analyze.cli import run as _analyze

        return _analyze(args)
    if args.command == "train":
        return _cmd_train(args)
    if args.command == "inspect":
        return _cmd_inspect(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
