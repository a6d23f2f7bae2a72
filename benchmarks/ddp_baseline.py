"""The external baseline: PyTorch DistributedDataParallel (gloo) on the same model and data.

    mpirun -n 4 .venv/bin/python benchmarks/ddp_baseline.py --epochs 30 --out RESULT.json
    mpirun -n 4 .venv/bin/python benchmarks/ddp_baseline.py --budget 60 --hidden 3000,3000 --lr 0.05 --out R.json

--budget stops training after that many seconds (all ranks stop at the same step); --hidden
trains hpcopt's MLP of those widths instead of the CNN.

Ranks come from Open MPI's environment; torch.distributed rendezvous over TCP on localhost.
Same model (MNIST-1D CNN), batch size per rank, local optimizer (SGD, Nesterov 0.9, weight decay
5e-4, cosine) and data order rule as hpcopt's workers. Rank 0 evaluates every --eval-seconds
and writes the curve as JSON.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from hpcopt.data import load_data
from hpcopt.launch.device import keep_freed_memory
from hpcopt.models.evaluate import evaluate
from hpcopt.models import CNN1D, build_model
from hpcopt.optim.schedule import learning_rate


def common(args, rank):
    """The model, local optimizer, data and data order every peer here trains with (this script
    and torchft_peer.py): one place, so the peers stay the same run."""
    from types import SimpleNamespace

    torch.manual_seed(0)  # identical initial weights on every rank
    net = build_model("mlp", {"hidden": [int(h) for h in args.hidden.split(",")]}) if args.hidden else CNN1D()
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    data = load_data("mnist1d")
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    spe = len(x) // args.batch
    return SimpleNamespace(net=net, opt=opt, x=x, y=y, xt=torch.from_numpy(data["x_test"]),
                           yt=torch.from_numpy(data["y_test"]), spe=spe, total=round(args.epochs * spe),
                           gen=torch.Generator().manual_seed(1_000_003 * 0 + rank),
                           n_params=sum(p.numel() for p in net.parameters()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--eval-seconds", type=float, default=0.5)
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=0.0, help="seconds of training at most (0: no limit)")
    ap.add_argument("--hidden", default="", help="comma-separated MLP widths (default: the CNN)")
    args = ap.parse_args()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", 0))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))
    torch.set_num_threads(1)
    keep_freed_memory()  # as hpcopt's workers do: the comparison is of the methods, not of malloc
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=size)
    c = common(args, rank)
    model, opt = DistributedDataParallel(c.net), c.opt  # (DDP trains the same parameter tensors)
    x, y, xt, yt, spe, total, gen, n_params = c.x, c.y, c.xt, c.yt, c.spe, c.total, c.gen, c.n_params
    curve, last_eval = [], -1e9
    dist.barrier()
    start = time.monotonic()
    stop = torch.zeros(1)
    for step in range(total):
        if args.budget and step % 5 == 0:  # rank 0's clock decides, so every rank stops at the same step
            stop[0] = float(rank == 0 and time.monotonic() - start > args.budget)
            dist.broadcast(stop, 0)
            if stop[0]:
                total = step  # the steps actually taken
                if rank == 0:
                    curve.append((time.monotonic() - start, *evaluate(model.module, xt, yt)))
                break
        if step % spe == 0:
            perm = torch.randperm(len(x), generator=gen)
        idx = perm[(step % spe) * args.batch:(step % spe + 1) * args.batch]
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, total, args.lr, "cosine")
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        now = time.monotonic() - start
        if rank == 0 and (now - last_eval >= args.eval_seconds or step == total - 1):
            last_eval = now
            curve.append((now, *evaluate(model.module, xt, yt)))
    wall = time.monotonic() - start
    dist.barrier()
    if rank == 0:
        ring = 2 * 2 * (size - 1) / size * n_params * 4  # ring allreduce of the gradients, sent + received
        with open(args.out, "w") as f:
            json.dump({"wall_seconds": wall, "curve": curve, "bytes_per_worker": ring * total,
                       "workers": size}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
