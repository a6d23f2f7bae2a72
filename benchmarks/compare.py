"""Every method on MNIST-1D with 4 workers, side by side, for the same wall-clock budget, against
PyTorch DDP (gloo).

    .venv/bin/python benchmarks/compare.py --budget 60                      # setting 1: the CNN
    .venv/bin/python benchmarks/compare.py --setting wide --budget 120      # setting 2 (root: netns + tc)

Setting 1 ("cnn"): the MNIST-1D CNN (5,210 parameters), each method's config from configs/, over
shared memory. Setting 2 ("wide"): a ~9.2M-parameter MLP (40 -> 3000 -> 3000 -> 10) with every
rank's traffic over an emulated 1 Gb/s link: a network namespace whose loopback has a `tbf` rate
limit (DESIGN.md), MPI and gloo over TCP on it, and no exchange in place through shared memory
(`--comm.shared_memory false`), as if every rank were on its own node. It needs root (ip netns, tc).

Every run (one after the other on this machine) trains for at most --budget seconds on its own
training clock: evaluations and traffic after that are not counted, and the run is asked to stop
(SIGUSR1, which mpirun forwards to every rank: hpcopt's workers make a last exchange and leave,
the file is completed; mpirun would answer a SIGTERM by killing the ranks) soon after; it ends
earlier when its epochs (--epochs, the same for every method) are done.
The table: final center (or average) test accuracy, wall seconds of training, seconds to 90% test
accuracy, MB sent + received per worker, and whether it reached the MNIST-1D paper's 94% (setting
1) -- or, in setting 2, the seconds each method took to reach the accuracy DDP ended its budget with.
Timings on a shared machine are noisy: run it more than once.

--torchft diloco,localsgd adds torchft 0.2.0's fault-tolerant DiLoCo and LocalSGD
(benchmarks/torchft_peer.py; `pip install -e .[bench]`) on the same model, data, workers and link.

--variants runs every asynchronous method in each variant: "plain", a codec of comm.compress
("bf16", "int8", "int4", "int2", "top8"), "overlap" (comm.overlap), or both joined by "+"
("int4+overlap"); Local SGD and DiLoCo run each codec without the overlap (their averages compress;
there is no overlap of a synchronous round), DP-SGD plain. With --utilisation, after the accuracy
runs, --rounds R rounds each measure the workers' compute alone (EAMSGD with one int2 exchange at the end), then run every
hpcopt row again: a row's worker compute utilisation in a round is its workers' samples per second
over the compute-alone run's of that round (1.0: communication costs nothing), and the table
gives the median over the rounds (one round of the same code gave 0.75 and 0.97 on two
invocations here: the machine's speed drifts). Both are measured in runs whose center is
evaluated only at the end and whose workers save no state (the compute-alone run saves none: its
workers save before an exchange), so each hpcopt row runs 1 + R times. A run with no exchanges has no
new center to evaluate, and evaluating the wide setting's 9.2M-parameter center every second
took 0.18 of the 2 cores (server 0.33 core with evaluations, 0.13 without): counted in, it
looked like a cost of communication (one invocation, the same variant: 0.70 vs 0.79).
"""

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parent.parent
SYNC = ("dp-sgd", "local-sgd", "diloco")
METHODS = {  # method -> (config, extra flags)
    # plain EASGD (SGD local steps) wants a larger lr than EAMSGD's 0.2: 30 epochs with lr 0.2 ended
    # at 67.7%, 0.5 at ~85%, 1.0 at 86.7%, 2.0 diverged (4 workers, measured one run each)
    "easgd": ("mnist1d_easgd.toml", ["--run.method", "easgd", "--train.momentum", "0.0", "--train.lr", "1.0"]),
    "eamsgd": ("mnist1d_easgd.toml", []),
    "mgrawa": ("mnist1d_mgrawa.toml", []),
    "lgrawa": ("mnist1d_lgrawa.toml", []),
    "lsgd": ("mnist1d_lsgd.toml", []),
    "lsgd-2level": ("mnist1d_lsgd_two_level.toml", []),
    "dp-sgd": ("mnist1d_dp_sgd.toml", []),
    "local-sgd": ("mnist1d_local_sgd.toml", []),
    "diloco": ("mnist1d_diloco.toml", []),
}
WIDE = {"hidden": [3000, 3000]}
WIDE_LR = 0.05
NETNS = "hpcopt-emu"


def env(wide: bool):
    e = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_rmaps_base_oversubscribe="1")
    if wide:  # every byte between ranks crosses the rate-limited loopback of the namespace
        e.update(OMPI_MCA_btl="self,tcp", OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo",
                 GLOO_SOCKET_IFNAME="lo")
    return e


def setup_netns(rate: str) -> None:
    """A network namespace whose loopback moves at most `rate` (DESIGN.md: netem is missing, tbf works)."""
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    for cmd in (["ip", "netns", "add", NETNS], ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"],
                ["ip", "netns", "exec", NETNS, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
                 "burst", "128kb", "latency", "10ms"]):
        subprocess.run(cmd, check=True)


def launch(cmd, wide, seconds, log, started=lambda: True):
    """Run cmd (in the namespace for the wide setting); SIGUSR1 (a graceful stop) `seconds` after
    `started()` first holds (startup is not training time), SIGKILL 60 s later."""
    if wide:
        cmd = ["ip", "netns", "exec", NETNS, *cmd]
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, env=env(wide), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = None
        while p.poll() is None and (t0 is None or time.monotonic() - t0 < seconds):
            if t0 is None and started():
                t0 = time.monotonic()
            time.sleep(0.2)
        stopped = p.poll() is None
        if stopped:
            p.send_signal(signal.SIGUSR1)  # mpirun forwards it; hpcopt's workers leave, the file completes
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return 0 if stopped and p.returncode in (0, 1) else p.returncode  # mpirun exits 1 after a forwarded signal


def time_to(curve, target):
    for t, _, acc in curve:
        if acc >= target:
            return t
    return None


def variant_flags(variant):
    """--comm flags of a variant: "plain", a codec, "overlap", or "int4+overlap"."""
    flags = []
    for part in variant.split("+"):
        if part == "overlap":
            flags += ["--comm.overlap", "true"]
        elif part == "alone":  # one exchange, at the end, compressed: a plain one (37 MB up and back per
            # worker in the wide setting) held a 100 Mb/s link for 5-25 s after the last step, counted
            # as compute time (the row's time is when the server had it): utilisations of 1.16-1.20
            flags += ["--easgd.tau", str(10 ** 9), "--comm.compress", "int2"]
        elif part in ("bf16", "int8", "int4", "int2", "top8"):
            flags += ["--comm.compress", part]
        elif part not in ("plain", "none"):
            raise SystemExit(f"unknown variant part {part!r} (plain, bf16, int8, int4, int2, top8, overlap)")
    return flags


def samples_per_second(exchanges):
    """Mean over workers of (samples at its last recorded exchange) / (that exchange's time)."""
    rates = []
    for w in set(exchanges["worker_id"].tolist()):
        mine = exchanges[exchanges["worker_id"] == w]
        last = mine[mine["samples"].argmax()]
        if last["time"] > 0:
            rates.append(float(last["samples"]) / float(last["time"]))
    return sum(rates) / len(rates) if rates else float("nan")


def sync_variants(method, variants) -> list:
    """The variants a synchronous method runs: its averages compress (Local SGD, DiLoCo; DP-SGD's
    gradients do not), and it has no overlap; each at most once, in the order asked."""
    if method == "dp-sgd":
        return ["plain"]
    out = []
    for v in variants:
        v = "+".join(p for p in v.split("+") if p != "overlap") or "plain"
        if v not in out:
            out.append(v)
    return out


def pinned(cmd, servers: int, server_cores: str, worker_cores: str) -> list:
    """cmd for every rank of an mpirun, the first `servers` ranks on `server_cores` and the others
    on `worker_cores` (taskset lists): a server with cores of its own, as on a cluster."""
    pick = (f'c={worker_cores}; [ "$OMPI_COMM_WORLD_RANK" -lt {servers} ] && c={server_cores}; '
            'exec taskset -c "$c" "$0" "$@"')
    return ["sh", "-c", pick, *cmd]


def run_hpcopt(method, workers, epochs, budget, out, wide, variant="plain", evals=True, server_cores=None):
    """One hpcopt run; evals=False: the center is evaluated only at the end and the workers save
    no state (utilisation runs);
    server_cores: (the server's cores, the workers' cores), or None (every rank on every core)."""
    config, extra = METHODS[method]
    # utilisation runs (evals=False) neither evaluate the center nor save the workers' state: the
    # compute-alone run does neither (no new center; its workers save before an exchange, and it
    # makes one, at the end), so either would count as communication what is not
    quiet = ["--record.eval_seconds", str(10 ** 9), "--record.checkpoint_seconds", str(10 ** 9)]
    extra = [*extra, *variant_flags(variant), *([] if evals else quiet)]
    ranks = workers + (0 if method in SYNC else 1)
    if wide:  # plain EASGD has no momentum: 10x the lr, as for the CNN (0.2 with momentum 0.9, 1.0 without)
        lr = 10 * WIDE_LR if method == "easgd" else WIDE_LR
        extra = [*extra, "--model.name", "mlp", "--model.kwargs", json.dumps(WIDE), "--train.lr", str(lr),
                 "--record.worker_every", "0", "--record.center_every", "1000000", "--comm.worker_timeout", "120",
                 "--comm.shared_memory", "false"]  # as between nodes: every exchange crosses the link
    rank = [sys.executable, "-m", "hpcopt", "train", "--config",
            str(ROOT / "configs" / config), "--out", str(out), "--train.epochs", str(epochs),
            "--record.eval_seconds", "1", "--record.flush_seconds", "1", *extra]
    if server_cores:
        rank = pinned(rank, ranks - workers, *server_cores)
    cmd = ["mpirun", "-n", str(ranks), *rank]
    rc = launch(cmd, wide, budget + 10, f"{out}.log", started=(out / "trajectory.h5").exists)
    with h5py.File(out / "trajectory.h5", "r", locking=False) as f:
        ev, ex = f["evals"][()], f["exchanges"][()]
        curve = [(float(t), float(l), float(a)) for _, t, l, a in ev if t <= budget + 5]
        return {"wall_seconds": min(float(f.attrs["wall_seconds"]), budget), "curve": curve, "rc": rc,
                "bytes_per_worker": float(ex["bytes"][ex["time"] <= budget].sum()) / workers,
                "samples_per_second": samples_per_second(ex)}


def run_ddp(workers, epochs, budget, out, wide, peer=None):
    """torch DDP (benchmarks/ddp_baseline.py), or with `peer` torchft's DiLoCo or LocalSGD
    (benchmarks/torchft_peer.py --algo PEER): same model, data, batch and local optimizer."""
    script = ["ddp_baseline.py"] if peer is None else ["torchft_peer.py", "--algo", peer]
    cmd = ["mpirun", "-n", str(workers), sys.executable, str(ROOT / "benchmarks" / script[0]), *script[1:],
           "--epochs", str(epochs), "--budget", str(budget), "--eval-seconds", "1", "--out", str(out)]
    if wide:
        cmd += ["--hidden", ",".join(map(str, WIDE["hidden"])), "--lr", str(WIDE_LR)]
    rc = launch(cmd, wide, budget + 600, f"{out}.log")  # it stops itself at the budget
    r = json.loads(Path(out).read_text())
    r["curve"] = [tuple(c) for c in r["curve"]]
    r["rc"] = rc
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=60, help="wall-clock seconds of training per method")
    ap.add_argument("--epochs", type=float, default=None,
                    help="epochs per worker, every method (default: 30 for cnn, 50 for wide: the budget ends them)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--setting", choices=("cnn", "wide"), default="cnn")
    ap.add_argument("--rate", default="1gbit", help="wide: the emulated link's rate (tc tbf)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all; wide: easgd,eamsgd,lsgd,mgrawa)")
    ap.add_argument("--variants", default="plain",
                    help="comma-separated: plain, bf16, int8, int4, int2, top8, overlap, or joined by + (int4+overlap)")
    ap.add_argument("--utilisation", action="store_true",
                    help="first measure the workers' compute alone, then report each run's utilisation (its "
                         "samples per second against the compute alone's; both runs evaluate the center only at "
                         "the end and save no worker state, so only communication tells them apart)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="utilisation: alternate the compute-alone run and every row's utilisation run this many "
                         "times and report the median of the rounds' ratios")
    ap.add_argument("--server-cores", default=None, metavar="SERVER:WORKERS",
                    help="utilisation runs only: pin the server rank and the workers to these cores (taskset "
                         "lists, e.g. 0:1), in the compute-alone run too: the server has cores of its own, as on "
                         "a cluster, so what utilisation loses is the workers' own cost of communicating")
    ap.add_argument("--no-ddp", action="store_true", help="skip the torch DDP row")
    ap.add_argument("--torchft", default="",
                    help="comma-separated torchft peers to add as rows: diloco, localsgd (needs the bench extra)")
    args = ap.parse_args()
    wide = args.setting == "wide"
    cores = tuple(args.server_cores.split(":")) if args.server_cores else None
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if cores and (len(cores) != 2 or not args.utilisation):
        raise SystemExit("--server-cores SERVER:WORKERS (e.g. 0:1) goes with --utilisation")
    epochs = args.epochs or (50 if wide else 30)
    methods = (args.methods or ("easgd,eamsgd,lsgd,mgrawa" if wide else ",".join(METHODS))).split(",")
    if wide:
        setup_netns(args.rate)
    tmp = Path(tempfile.mkdtemp(prefix="hpcopt-compare-"))
    rows = []
    util: dict[str, list[float]] = {}  # row -> its utilisation in each round
    runs = []  # (name, method, variant, stem) of the hpcopt rows
    variants = args.variants.split(",")
    for method in methods:
        for variant in sync_variants(method, variants) if method in SYNC else variants:
            name = method if variant == "plain" else f"{method} [{variant}]"
            print(f"running {name} ...", flush=True)
            stem = tmp / name.replace(" ", "_").replace("[", "").replace("]", "")
            rows.append((name, run_hpcopt(method, args.workers, epochs, args.budget, stem, wide, variant)))
            runs.append((name, method, variant, stem))
    # utilisation: rounds of the compute alone (one exchange, at the end), then each row again
    # evaluated only at the end; each round's ratios are taken within it (this machine's speed
    # drifts between runs) and the table gives their median
    for rnd in range(args.rounds if args.utilisation else 0):
        print(f"utilisation round {rnd + 1} of {args.rounds}: eamsgd without communication (compute alone) ...",
              flush=True)
        alone = run_hpcopt("eamsgd", args.workers, epochs, args.budget, tmp / f"alone-{rnd}", wide, "alone",
                           evals=False, server_cores=cores)
        if rnd == 0:
            rows.insert(0, ("compute alone", alone))
        util.setdefault("compute alone", []).append(1.0)
        for name, method, variant, stem in runs:
            print(f"utilisation round {rnd + 1}: {name}, evaluated only at the end ...", flush=True)
            u = run_hpcopt(method, args.workers, epochs, args.budget, Path(f"{stem}-util-{rnd}"), wide, variant,
                           evals=False, server_cores=cores)
            util.setdefault(name, []).append(u["samples_per_second"] / alone["samples_per_second"])
    ddp = None
    if not args.no_ddp:
        print("running torch DDP (gloo) ...", flush=True)
        ddp = run_ddp(args.workers, epochs, args.budget, tmp / "ddp.json", wide)
        rows.append(("torch DDP (gloo)", ddp))
    for peer in filter(None, args.torchft.split(",")):
        print(f"running torchft {peer} ...", flush=True)
        rows.append((f"torchft {peer}", run_ddp(args.workers, epochs, args.budget, tmp / f"torchft-{peer}.json",
                                                wide, peer)))
    what = (f"MLP 40-3000-3000-10 (9.2M parameters), all traffic over an emulated {args.rate}/s link" if wide
            else "CNN (5,210 parameters)")
    print(f"\nMNIST-1D {what}, {args.workers} workers, budget {args.budget:g} s, at most {epochs:g} epochs "
          f"per worker, batch 100 per worker (logs in {tmp})")
    ddp_final = ddp["curve"][-1][2] if ddp and ddp["curve"] else float("nan")
    last = ("reached 94%" if not wide else f"s to {100 * ddp_final:.1f}%" if ddp
            else "s to DDP's final (--no-ddp)")
    print(f"{'method':26s} {'final acc':>9s} {'wall s':>7s} {'s to 90%':>9s} {'MB/worker':>10s}"
          + (f" {'util':>5s}" if util else "") + f"  {last}")
    for name, r in rows:
        acc = r["curve"][-1][2] if r["curve"] else float("nan")
        t90 = time_to(r["curve"], 0.90)
        if wide and not ddp:
            note = "-"
        elif wide:
            t = time_to(r["curve"], ddp_final)
            ratio = time_to(ddp["curve"], ddp_final) if ddp else None
            note = f"{t:.1f} ({ratio / t:.1f}x sooner than DDP)" if t is not None and ratio else "never"
        else:
            t94 = time_to(r["curve"], 0.94)
            cut = r["wall_seconds"] >= args.budget - 0.5  # stopped by the budget, not by its epochs
            note = (f"yes ({t94:.1f} s)" if t94 is not None
                    else f"no (budget {args.budget:g} s)" if cut else f"no ({epochs:g} epochs)")
        ok = [v for v in util.get(name, []) if math.isfinite(v)]  # (a failed run's NaN is not ordered)
        u = statistics.median(ok) if ok else None
        print(f"{name:26s} {100 * acc:8.2f}% {r['wall_seconds']:7.1f} "
              f"{(f'{t90:9.1f}' if t90 is not None else '    never'):>9s} {r['bytes_per_worker'] / 1e6:10.1f}"
              + ((f" {u:5.2f}" if u else "     -") if util else "") + f"  {note}"
              + (f"  (exit {r['rc']})" if r.get("rc") not in (0, None) else ""))
    if args.rounds > 1 and util:
        print(f"\nutilisation in each of {args.rounds} rounds (the table: their median):")
        for name, values in util.items():
            if name != "compute alone":
                print(f"  {name:26s} " + " ".join(f"{v:.2f}" for v in values))
    for name, ref in rows:  # the goal against an external peer: its final accuracy, sooner
        if name.startswith("torchft") and ref["curve"]:
            target = ref["curve"][-1][2]
            print(f"\nseconds to {name}'s final accuracy ({100 * target:.1f}%):")
            for other, r in rows:
                t = time_to(r["curve"], target)
                print(f"  {other:26s} {'never' if t is None else f'{t:.1f}'}")

if __name__ == "__main__":
    main()
