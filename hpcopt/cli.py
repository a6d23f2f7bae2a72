"""The `hpcopt` command.

    mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/mine
    hpcopt inspect runs/mine/trajectory.h5 [--json]
    hpcopt export runs/mine -o model.pt
    hpcopt import ckpts/ --model cnn1d --data mnist1d -o runs/theirs
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hpcopt import __version__


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train with asynchronous EASGD/EAMSGD (run under mpirun or srun)",
        description="Train with asynchronous elastic averaging. Ranks 0..S-1 hold the center\n"
                    "(S = run.servers), all other ranks are workers.\n\n"
                    "  mpirun -n 5 hpcopt train --config configs/mnist1d_easgd.toml --out runs/mine\n"
                    "  hpcopt train -n 5 --config configs/mnist1d_easgd.toml --out runs/mine   # joinable\n"
                    "  hpcopt train -n 3 --resume runs/mine                                    # continue\n\n"
                    "Every config field can be overridden with --section.key VALUE.",
        epilog="The trajectory goes to OUT/trajectory.h5; read it with `hpcopt inspect`.")
    p.add_argument("--config", "-c", metavar="TOML", help="config file (default: the built-in defaults)")
    p.add_argument("--out", "-o", metavar="DIR", help="run directory (same as --run.out)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT/trajectory.h5")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help="server 0 writes live metrics as TensorBoard event files: to OUT/tensorboard, or to "
                        "DIR/NAME-HASH (this run's own folder, so runs can share DIR: tensorboard --logdir DIR "
                        "shows them side by side); the same as --record.tensorboard true "
                        "[--record.tensorboard_dir DIR]")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, with any "
                   "number of workers (its config.toml is used; flags still override)")
    p.add_argument("-n", "--np", type=int, metavar="N", help="launch it yourself: start an ompi-server (so "
                   "workers can join later) and `mpirun -n N` (only outside mpirun)")
    from hpcopt.config import SECTIONS
    from hpcopt.flags import add_flags

    for section, cls in SECTIONS.items():
        add_flags(p.add_argument_group(f"[{section}]"), cls, flag=lambda n, s=section: f"--{s}.{n}",
                  dest=lambda n, s=section: f"set:{s}.{n}", values=True)
    return p


def _cmd_train(args) -> int:
    from hpcopt.launch.launcher import launch, under_mpi_launcher

    if args.np is not None:
        return _launch_train(args, launch, under_mpi_launcher)
    from hpcopt.launch.env import record_started

    record_started()  # (under `hpcopt train -n`: the launcher watches this rank from now on)
    import mpi4py

    from hpcopt.comm.joins import joins_possible
    from hpcopt.launch.device import narrow_mig_early

    # One thread at a time calls MPI (a worker's overlapped exchange runs in a thread:
    # comm.overlap), except the threads that accept joins (they need an ompi-server, so the
    # stricter level is asked for only then).
    mpi4py.rc.thread_level = "multiple" if joins_possible() else "serialized"
    narrow_mig_early()
    from mpi4py import MPI

    from hpcopt import config as C
    from hpcopt.launch.env import install_abort_on_error
    from hpcopt.io.recorder import RecordingError
    from hpcopt.roles.train import UsageError, train

    rank = MPI.COMM_WORLD.rank
    overrides = _overrides(args)
    config_file = args.config
    if args.resume:
        from pathlib import Path

        config_file = config_file or str(Path(args.resume) / "config.toml")
        overrides["run.out"] = args.resume
        if not Path(config_file).exists():
            if rank == 0:
                print(f"hpcopt train: error: --resume {args.resume}: no config.toml there; is it a run "
                      f"directory?", file=sys.stderr)
            return 2
    try:
        cfg = C.load(config_file, overrides)
    except C.ConfigError as e:  # the same on every rank: report once, exit cleanly
        if rank == 0:
            print(f"hpcopt train: config error: {e}", file=sys.stderr)
        return 2
    missing = _tensorboard_missing(cfg)  # before anything is trained (the same on every rank)
    if missing:
        if rank == 0:
            print(f"hpcopt train: error: {missing}", file=sys.stderr)
        return 2
    install_abort_on_error(MPI.COMM_WORLD)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    try:
        result = train(cfg, force=args.force, resume=bool(args.resume), log=log)
    except UsageError as e:
        if rank == 0:
            print(f"hpcopt train: error: {e}", file=sys.stderr)
        return 2
    except RecordingError as e:  # on the recording rank(s): one clear line, then the whole job ends
        from hpcopt.launch.env import abort_job, record_outcome

        print(f"hpcopt train: error: {e}", file=sys.stderr, flush=True)
        record_outcome(1)  # (may fail too, on the same full disk: the launcher then says "killed?")
        if rank == 0:
            from hpcopt.io.rundir import RunDir

            RunDir(cfg.run.out).unlock()  # abort_job does not return: the finally below would not run
        abort_job(MPI.COMM_WORLD)
    finally:
        if rank == 0:
            from hpcopt.io.rundir import RunDir

            RunDir(cfg.run.out).unlock()  # (only if this process took it)
    run = result.run
    if run is not None and run.all_diverged:
        print(f"hpcopt train: error: every worker diverged (NaN/Inf or exploding loss, reset "
              f"train.max_resets={cfg.train.max_resets} times each); lower train.lr (now {cfg.train.lr})",
              file=sys.stderr)
        return 1
    if run is not None and run.all_crashed:
        print("hpcopt train: error: every worker crashed (see their errors above, or OUT/logs/ under "
              "`hpcopt train -n`); the servers recorded what was done", file=sys.stderr)
        return 1
    if run is not None:
        what, who = (f"{run.exchanges} synchronous rounds", "average") if run.synchronous \
            else (f"{run.exchanges} exchanges", "center")
        log(f"done: {what} in {run.wall_seconds:.1f} s; final {who} test accuracy {100 * run.final_accuracy:.2f}%")
        if run.cpu_seconds is not None:
            log(f"server 0 used {run.cpu_seconds:.1f} s of CPU ({run.polls} polls)")
        log(f"trajectory: {run.path}   (see it with: hpcopt inspect {run.path})")
    return 0


def _overrides(args) -> dict:
    """Config overrides from train's flags: --section.key VALUE, --out, --tensorboard [DIR]."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set:")}
    if args.out:
        overrides["run.out"] = args.out
    if args.tensorboard is not None:
        overrides["record.tensorboard"] = True
        if args.tensorboard:
            overrides["record.tensorboard_dir"] = args.tensorboard
    return overrides


def _tensorboard_missing(cfg) -> str | None:
    """Why record.tensorboard cannot work here (the package is not installed), or None."""
    if not cfg.record.tensorboard:
        return None
    from hpcopt.io.tensorboard import TensorBoardMissing, require

    try:
        require()
    except TensorBoardMissing as e:
        return str(e)
    return None


def _launch_train(args, launch, under_mpi_launcher) -> int:
    from pathlib import Path

    from hpcopt import config as C

    if under_mpi_launcher():
        print("hpcopt train: error: -n launches mpirun itself; under mpirun/srun leave it out", file=sys.stderr)
        return 2
    argv = sys.argv[sys.argv.index("train") + 1:] if "train" in sys.argv else []
    rest, skip = [], False
    for a in argv:  # everything but -n N is passed on to the ranks
        if skip:
            skip = False
        elif a in ("-n", "--np"):
            skip = True
        elif not a.startswith(("-n=", "--np=")) and not (a.startswith("-n") and a[2:].isdigit()):  # -n2 too
            rest.append(a)
    if args.resume:
        out = Path(args.resume)
        if not (out / "config.toml").is_file():  # before the launcher makes a folder there (a typo)
            print(f"hpcopt train: error: --resume {out}: no run there (no {out / 'config.toml'})", file=sys.stderr)
            return 2
        try:
            cfg = C.load(args.config or str(out / "config.toml"), {})
        except (C.ConfigError, OSError):
            cfg = None  # the ranks say what is wrong with it
    else:
        try:
            cfg = C.load(args.config, _overrides(args))
        except C.ConfigError as e:
            print(f"hpcopt train: config error: {e}", file=sys.stderr)
            return 2
        out = Path(cfg.run.out)
        missing = _tensorboard_missing(cfg)  # before mpirun starts N ranks only to find it out
        if missing:
            print(f"hpcopt train: error: {missing}", file=sys.stderr)
            return 2
        if (out / "trajectory.h5").exists() and not args.force:
            print(f"hpcopt train: error: {out / 'trajectory.h5'} already exists; choose another --out, pass "
                  f"--force to overwrite it, or --resume {out} to continue it", file=sys.stderr)
            return 2
    from hpcopt.io.rundir import RunDir, RunLocked

    try:
        held = RunDir(out).hold_launch()  # one launcher per run, until it ends
    except (RunLocked, OSError) as e:
        print(f"hpcopt train: error: {e}", file=sys.stderr)
        return 2
    try:
        live = _live_owner(out, cfg)
        if live:  # before anything starts: a new ompi-server would replace the live run's rendezvous
            print(f"hpcopt train: error: {live}", file=sys.stderr)
            return 2
        return launch(args.np, ["train", *rest], out, own_server=True)
    finally:
        if held is not None:
            os.close(held)


def _live_owner(out, cfg) -> str | None:
    """Why `out` may not be trained now (a live training holds its lock), or None."""
    from hpcopt.io.rundir import RunDir, _read_lock
    from hpcopt.roles.train import _stale_seconds

    import time

    run = RunDir(out)
    stale_seconds = _stale_seconds(cfg) if cfg is not None else 60.0
    deadline = time.monotonic() + 1.0  # a training killed a moment ago may still be exiting
    while run.lock_file.exists() and run.stale(stale_seconds) is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    else:
        return None
    owner = _read_lock(run.lock_file)
    return (f"{out} is being trained by pid {owner.get('pid')} on {owner.get('host')}; stop it first, or wait "
            f"for it to end")


def _cmd_join(args) -> int:
    from hpcopt.launch.launcher import launch, under_mpi_launcher

    if args.np is not None:
        if under_mpi_launcher():
            print("hpcopt join: error: -n launches mpirun itself; under mpirun/srun leave it out", file=sys.stderr)
            return 2
        from pathlib import Path

        from hpcopt.comm.joins import not_running
        from hpcopt.io.rundir import RunDir

        why = not_running(RunDir(args.run))  # before mpirun starts N ranks only to find it out
        if why is not None:
            print(f"hpcopt join: error: {why}", file=sys.stderr)
            return 2
        if args.token:  # to the ranks through the environment: a command line is public (ps)
            os.environ["HPCOPT_JOIN_TOKEN"] = args.token
        return launch(args.np, ["join", args.run], Path(args.run), own_server=False)
    import mpi4py

    mpi4py.rc.thread_level = "multiple"  # the connect runs in a thread, so it can have a deadline
    from hpcopt.launch.device import narrow_mig_early

    narrow_mig_early()
    from mpi4py import MPI

    from hpcopt.launch.env import install_abort_on_error
    from hpcopt.roles.join import join
    from hpcopt.roles.train import UsageError

    rank = MPI.COMM_WORLD.rank
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    install_abort_on_error(MPI.COMM_WORLD)
    try:
        summary = join(args.run, token=args.token or os.environ.get("HPCOPT_JOIN_TOKEN"), log=log)
    except UsageError as e:
        if rank == 0:
            print(f"hpcopt join: error: {e}", file=sys.stderr)
        return 2
    print(f"worker {summary.worker_id}: {summary.reason} after {summary.steps} steps, "
          f"{summary.exchanges} exchanges", flush=True)
    return 0


def _cmd_status(args) -> int:
    from hpcopt.io.status import format_status, read_status

    try:
        status = read_status(args.run)
    except ValueError as e:
        print(f"hpcopt status: error: {e}", file=sys.stderr)
        return 2
    try:
        text = json.dumps(status) if args.json else format_status(status)
    except (TypeError, ValueError, KeyError, OverflowError) as e:  # a shape read_status did not foresee
        print(f"hpcopt status: error: malformed status.json in {args.run}: {e}", file=sys.stderr)
        return 2
    print(text)
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


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a saved model of a run (the final center by default) as a PyTorch state_dict",
        description="Write one saved model of RUN as a PyTorch state_dict of the run's model, which is\n"
                    "rebuilt from the config the run recorded (a user's model factory must be importable).\n\n"
                    "  hpcopt export runs/demo -o model.pt                  # the final center\n"
                    "  hpcopt export runs/demo --at center:5 -o c5.pt       # center snapshot row 5\n"
                    "  hpcopt export runs/demo --at worker:2 -o w2.safetensors\n\n"
                    "Load it into the model the run trained: model.load_state_dict(torch.load('model.pt')),\n"
                    "e.g. hpcopt.models.build_model('cnn1d', {}) for a built-in; or in Python get the module\n"
                    "itself: hpcopt.load_model('runs/demo', at='center'). A finished training also leaves\n"
                    "RUN/center.pt, the same file as --at center.",
        epilog="A trajectory records the trainable parameters: buffers (BatchNorm statistics) and frozen\n"
               "parameters keep the values the model is built with under the run's seed.")
    p.add_argument("run", metavar="RUN", help="the run directory (or its trajectory.h5)")
    p.add_argument("--at", default="center", metavar="MODEL",
                   help="which saved model: center (the last center snapshot, the default: the final center of a "
                        "finished training), center:I (center snapshot row I; negative counts from the end), "
                        "worker:ID (worker ID's last recorded snapshot, see record.worker_every); also init "
                        "(center row 0) and worker:ID:K (that worker's K-th snapshot)")
    p.add_argument("-o", "--out", required=True, metavar="FILE",
                   help="the file to write: FILE.safetensors in the safetensors format (needs `pip install "
                        "safetensors`), any other name in torch.save's (.pt); written atomically")


def _cmd_export(args) -> int:
    from hpcopt.export import ExportError, export

    try:
        model = export(args.run, args.at, args.out)
    except ExportError as e:
        print(f"hpcopt export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"hpcopt export: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {args.at} of {args.run} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def _exit_without_fence(code: int) -> int:
    """In Open MPI's recovery mode (`hpcopt train -n`), a rank that is done exits right away
    instead of entering MPI_Finalize: its fence includes every rank the job ever had, and with a
    rank that was killed (a crashed worker) it can wait forever. Everything is written and closed
    by now; mpirun in recovery mode takes such an exit as a normal one (status 0)."""
    from hpcopt.launch.env import record_outcome

    record_outcome(code)
    if os.environ.get("OMPI_MCA_orte_enable_recovery", "0").lower() in ("1", "true", "yes") \
            and os.environ.get("OMPI_COMM_WORLD_SIZE"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # short output is still in the buffer: a closed pipe shows here
        return code
    except BrokenPipeError:
        # The reader of our stdout is gone (`hpcopt inspect RUN | head -1`): nobody wants the rest,
        # so no traceback. Point stdout at /dev/null so the flush at exit does not fail again, and
        # exit as a tool killed by SIGPIPE shows in the shell (128 + 13): the output was cut short.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] in (["train"], ["join"]):
        from hpcopt.launch.signals import catch_early

        catch_early()  # a stop or a preemption while this process starts is not a crash
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
    p = sub.add_parser("join", help="add workers to a running training",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Add this MPI job's ranks as workers to the training running in RUN.\n\n"
                                   "  hpcopt join runs/mine -n 2          # starts mpirun -n 2 itself\n"
                                   "  OMPI_MCA_pmix_server_uri=file:runs/mine/ompi-server.uri \\\n"
                                   "      mpirun -n 2 hpcopt join runs/mine\n\n"
                                   "The training must have been started with `hpcopt train -n N` (or under an\n"
                                   "ompi-server whose URI is in RUN/ompi-server.uri). New workers start from the\n"
                                   "current center. They leave on SIGTERM/SIGINT/SIGUSR1/SIGUSR2.")
    p.add_argument("run", metavar="RUN", help="the run directory of a running training")
    p.add_argument("--token", help="the join token (default: HPCOPT_JOIN_TOKEN, else read RUN/token, which "
                   "only the run's owner can read); prefer those: a command line is visible to every user")
    p.add_argument("-n", "--np", type=int, metavar="N", help="launch `mpirun -n N` yourself (outside mpirun)")
    p = sub.add_parser("status", help="live status of a run: members, exchanges/s, center accuracy",
                       description="Print the live status of a run from RUN/status.json, which server 0 "
                                   "rewrites at every flush.")
    p.add_argument("run", metavar="RUN", help="the run directory")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    _export_parser(sub)
    from hpcopt.importer import add_parser as _import_parser

    _import_parser(sub)
    from hpcopt.analyze.cli import add_parser as _analyze_parser

    _analyze_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "analyze":
        from hpcopt.analyze.cli import run as _analyze

        return _analyze(args)
    if args.command == "train":
        return _exit_without_fence(_cmd_train(args))
    if args.command == "inspect":
        return _cmd_inspect(args)
    if args.command == "join":
        return _exit_without_fence(_cmd_join(args))
    if args.command == "status":
        return _cmd_status(args)
    if args.command == "export":
        return _cmd_export(args)
    if args.command == "import":
        from hpcopt.importer import main as _import

        return _import(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
