"""Train the MNIST-1D CNN with plain PyTorch SGD and record its trajectory with hpcopt.Recorder,
so that `hpcopt analyze` compares it with an hpcopt run in one report.

    .venv/bin/python examples/plain_pytorch.py --epochs 30 --out runs/plain
    mpirun -n 5 .venv/bin/hpcopt train --config configs/mnist1d_easgd.toml --out runs/eamsgd
    .venv/bin/hpcopt analyze runs/plain --compare runs/eamsgd --out runs/compare   # runs/compare/compare.html

The model and the data are hpcopt's (the factories "cnn1d" and "mnist1d" that
configs/mnist1d_easgd.toml names); the loop, the optimizer and the evaluation are plain PyTorch.
Your own script needs only the Recorder lines; `model_factory` and `data` are the
"module:function" names of your model and data (or built-ins), which analysis calls to rebuild them.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import hpcopt
from hpcopt.data import load_data
from hpcopt.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/plain", help="run directory (default: runs/plain)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--every", type=int, default=40, help="steps between two recorded snapshots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    d = load_data("mnist1d")
    x, y = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
    x_test, y_test = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
    model = build_model("cnn1d")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    steps = args.epochs * (len(x) // args.batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    with hpcopt.Recorder(args.out, model, every=args.every, model_factory="cnn1d", data="mnist1d",
                         seed=args.seed, method="sgd (plain PyTorch)", overwrite=args.overwrite) as rec:
        for epoch in range(args.epochs):
            model.train()
            for i in torch.randperm(len(x)).split(args.batch):
                lr = opt.param_groups[0]["lr"]
                loss = F.cross_entropy(model(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                rec.step(loss=loss, batch=len(i), lr=lr)
            model.eval()
            with torch.no_grad():
                out = model(x_test)
                test_loss = F.cross_entropy(out, y_test).item()
                acc = (out.argmax(1) == y_test).float().mean().item()
            rec.evaluate(acc=acc, loss=test_loss)
            print(f"epoch {epoch + 1:3d}  test accuracy {100 * acc:5.2f}%  loss {test_loss:.4f}", flush=True)
    print(f"trajectory: {rec.path}   (hpcopt inspect {args.out}; hpcopt analyze {args.out})")


if __name__ == "__main__":
    main()
