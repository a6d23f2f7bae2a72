"""The chaos benchmark's model ('chaos_model:model'): the MNIST-1D CNN, with a way in for NaN
and Inf faults. With HPCOPT_CHAOS_POISON naming a folder, a worker that finds a file named after
its pid there, before a forward pass, reads what it says and removes it:

    nan, inf     every parameter is multiplied by it (a blow-up: NaN/Inf weights, a NaN loss)
    nan_grad     this step's gradients are NaN while its loss stays finite

The reference run uses the same model with no file ever written: the same numbers.
"""

import math
import os
from pathlib import Path

import torch

from hpcopt.models import build_model

POISON = "HPCOPT_CHAOS_POISON"


def model(**kwargs):
    m = build_model("cnn1d", kwargs)
    where = os.environ.get(POISON)
    if where:
        order = Path(where) / str(os.getpid())
        state = {"grad": False}

        def before(module, args):
            if not order.exists():
                return
            what = order.read_text().strip()
            order.unlink()
            if what == "nan_grad":
                state["grad"] = True
                return
            with torch.no_grad():
                for p in module.parameters():
                    p.mul_(math.inf if what == "inf" else math.nan)

        def after(module, args, out):
            if state["grad"] and out.requires_grad:
                state["grad"] = False
                out.register_hook(lambda g: torch.full_like(g, math.nan))

        m.register_forward_pre_hook(before)
        m.register_forward_hook(after)
    return m
