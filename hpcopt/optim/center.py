"""Center rules: what a server does with its shard of the center when a worker exchanges.

One class per rule, pure (torch tensors in and out; no MPI, no I/O), owning its state: the
workers' latest parameters, gradient norms, loss averages. A server (hpcopt.comm.server) moves
the bytes and calls these; the tests replay them against NumPy. A new averaging rule is one new
class here and one entry in RULES.

Every rule sees one server's shard of the flat parameter vector; chunk coordinates [a, b) are
shard-local. The interface:

    add(wid, group)          a worker joins (group: its node, for two-level LSGD)
    forget(wid)              a worker left or was dropped: its state no longer counts
    report(wid, ...)         the scalars of its exchange header (before any of its chunks)
    exchange_(wid, x, a, b)  rules whose exchanges carry the worker's parameters (`carries_params`):
                             move center[a:b] and turn x, the worker's parameters of that chunk,
                             into its new parameters, in place
    worker_scalars(wid)      (loss average, gradient norm) for the checkpoint
    held()                   the per-worker parameters the rule keeps (for the checkpoint)
    restore(wid, ...)        a resumed run takes them back

LSGD (LeaderRule) is different on the wire, so it has `verdict` and `upload` instead of exchange_.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .easgd import elastic_exchange_
from .grawa import inverse_norm_weights, layerwise_center_, shard_segments, weighted_center_
from .lsgd import group_leader, leader, loss_average, pull_target


class CenterRule:
    """Base: a rule without per-worker state."""

    name = "base"
    carries_params = True  # an exchange sends the worker's parameters and answers with its new ones

    def __init__(self, center: torch.Tensor, alpha: float):
        self.center, self.alpha = center, float(alpha)

    def add(self, wid: int, group=None) -> None:
        pass

    def forget(self, wid: int) -> None:
        pass

    def report(self, wid: int, *, loss: float, grad_norm: float, exchange: int,
               layer_norms: np.ndarray | None = None) -> None:
        pass

    def exchange_(self, wid: int, x: torch.Tensor, a: int, b: int) -> None:
        raise NotImplementedError

    def worker_scalars(self, wid: int) -> tuple[float, float]:
        return math.nan, math.nan

    def held(self) -> dict[int, torch.Tensor]:
        return {}

    def restore(self, wid: int, *, loss_avg: float, grad_norm: float, params: torch.Tensor | None) -> None:
        pass


class ElasticRule(CenterRule):
    """EASGD / EAMSGD (Zhang et al. 2015, Algorithm 1): x <- x - alpha (x - c), c <- c + alpha (x - c)."""

    name = "easgd"

    def exchange_(self, wid, x, a, b):
        elastic_exchange_(self.center[a:b], x, self.alpha)


class GrawaRule(CenterRule):
    """MGRAWA, or LGRAWA with `layers` (Dimlioglu & Choromanska 2024), asynchronous: the center is
    the average of every worker's latest parameters weighted by 1 / its latest gradient norm
    (per layer for LGRAWA), and the worker is pulled toward it, x <- x + alpha (center - x).
    A worker counts once it has reported a finite norm; until then (it left before its first
    tau steps, or its gradient was not finite) its parameters are kept but not averaged."""

    def __init__(self, center, alpha, layers: list[tuple[int, int]] | None = None, lo: int = 0):
        super().__init__(center, alpha)
        # LGRAWA: the parts of the model's layers that fall in this shard (shard-local)
        self.segments = shard_segments(layers, lo, lo + len(center)) if layers else None
        self.name = "lgrawa" if layers else "mgrawa"
        self.latest: dict[int, torch.Tensor] = {}
        self.norms: dict[int, float | np.ndarray] = {}  # MGRAWA: a float; LGRAWA: one per layer

    def add(self, wid, group=None):
        self.latest[wid] = self.center.clone()

    def forget(self, wid):
        self.latest.pop(wid, None)
        self.norms.pop(wid, None)

    def report(self, wid, *, loss, grad_norm, exchange, layer_norms=None):
        norm = grad_norm if self.segments is None else layer_norms
        if norm is not None and np.isfinite(norm).all() and (np.asarray(norm) >= 0).all():
            self.norms[wid] = norm

    def exchange_(self, wid, x, a, b):
        self.latest[wid][a:b] = x  # this worker's new parameters count from now on
        ids = sorted(self.norms)
        if ids:  # nobody has reported a norm yet: the center stays where it is
            if self.segments is None:
                weights = inverse_norm_weights(torch.tensor([self.norms[w] for w in ids], dtype=torch.float64))
                weighted_center_(self.center[a:b], [self.latest[w][a:b] for w in ids], weights.tolist())
            else:
                weights = inverse_norm_weights(torch.from_numpy(np.stack([self.norms[w] for w in ids])))
                layerwise_center_(self.center, [self.latest[w] for w in ids], weights, self.segments, a, b)
        x.lerp_(self.center[a:b], self.alpha)

    def worker_scalars(self, wid):
        norm = self.norms.get(wid, math.nan)
        return math.nan, float(norm) if np.ndim(norm) == 0 else math.nan

    def held(self):
        return self.latest

    def restore(self, wid, *, loss_avg, grad_norm, params):
        if self.segments is None and math.isfinite(grad_norm):
            self.norms[wid] = float(grad_norm)
        if params is not None and wid in self.latest:
            self.latest[wid].copy_(params)


@dataclass
class Verdict:
    """LSGD's answer to an exchange header: whether the worker sends its parameters (it leads,
    or a snapshot is due), and the pull x <- x + rate (target - x) it makes (target None: none)."""
    send: bool
    leads: bool
    rate: float
    leader: int
    global_leader: int
    target: torch.Tensor | None


class LeaderRule(CenterRule):
    """LSGD (Teng et al. 2019): only leaders' parameters travel. The rule holds the parameters of
    the workers that led at their own latest exchange. At an exchange the worker's loss average
    is updated; if it is now the lowest (of its node, with two levels), the worker leads: it sends
    its parameters, which replace what it held, and is not pulled. Otherwise what it held is
    dropped (no longer a leader's) and it is pulled toward the best-loss worker whose parameters
    are held (of its node; and on global exchanges also toward the best overall)."""

    name = "lsgd"
    carries_params = False

    def __init__(self, center, lam: float, *, loss_decay: float = 0.0, lam_g: float = 0.0,
                 global_every: int = 0):
        super().__init__(center, lam)
        self.loss_decay, self.lam_g, self.global_every = loss_decay, float(lam_g), int(global_every)
        self.loss_avg: dict[int, float] = {}
        self.grad_norms: dict[int, float] = {}
        self.groups: dict[int, object] = {}
        self.latest: dict[int, torch.Tensor] = {}  # the leaders' parameters

    def add(self, wid, group=None):
        self.groups[wid] = group

    def forget(self, wid):
        for d in (self.loss_avg, self.grad_norms, self.latest):
            d.pop(wid, None)

    def verdict(self, wid: int, *, loss: float, grad_norm: float, exchange: int, sample: bool) -> Verdict:
        """Take the worker's report and decide what its exchange does (see the class)."""
        self.grad_norms[wid] = grad_norm
        if math.isfinite(loss):  # no loss to report (no batches), or a bad one: the average stays
            self.loss_avg[wid] = loss_average(self.loss_avg.get(wid), loss, self.loss_decay)
        glob, lead = -1, -1  # -1: nobody has a finite average yet
        if self.global_every:  # two-level: the local leader, and the global one when due
            groups = {w: self.groups[w] for w in self.loss_avg}
            if wid in self.loss_avg:
                lead = group_leader(self.loss_avg, groups, wid)
            if exchange % self.global_every == 0 and self.loss_avg:
                glob = leader(self.loss_avg)
        elif self.loss_avg:
            lead = leader(self.loss_avg)
        held = self.latest
        local = [w for w in held if not self.global_every or self.groups[w] == self.groups[wid]]
        leads = lead == wid
        best = lambda ws: min(ws, key=lambda w: (self.loss_avg[w], w), default=-1)  # noqa: E731
        lead = wid if leads else best(w for w in local if w != wid)
        pulls = [] if leads or lead < 0 else [(self.alpha, held[lead])]
        if glob >= 0:
            if glob == wid:
                leads = True  # the global leader leads its node too
            else:
                glob = best(w for w in held if w != wid)
                if glob >= 0:
                    pulls.append((self.lam_g, held[glob]))
        if not leads:
            held.pop(wid, None)
        target, rate = pull_target(pulls)  # one target is a held buffer, never written again
        return Verdict(send=leads or sample, leads=leads, rate=rate, leader=lead, global_leader=glob, target=target)

    def upload(self, wid: int, params: torch.Tensor) -> None:
        """A leader's parameters arrived: they are what others are pulled toward, and the center
        the trajectory records (the latest leader upload)."""
        self.latest[wid] = params
        self.center.copy_(params)

    def worker_scalars(self, wid):
        return self.loss_avg.get(wid, math.nan), self.grad_norms.get(wid, math.nan)

    def held(self):
        return self.latest

    def restore(self, wid, *, loss_avg, grad_norm, params):
        if math.isfinite(loss_avg):
            self.loss_avg[wid] = float(loss_avg)
        if params is not None:
            self.latest[wid] = params.clone()


# config's run.method -> the center rule ("grawa" is the paper's model-level algorithm: MGRAWA)
RULES = {"easgd": "easgd", "eamsgd": "easgd", "grawa": "mgrawa", "mgrawa": "mgrawa", "lgrawa": "lgrawa",
         "lsgd": "lsgd"}


def make_rule(method: str, center: torch.Tensor, *, alpha: float, layers=None, lo: int = 0,
              loss_decay: float = 0.0, lam_g: float = 0.0, global_every: int = 0) -> CenterRule:
    """The center rule of an asynchronous method, on a server's shard `center` (starting at `lo`)."""
    rule = RULES.get(method)
    if rule == "easgd":
        return ElasticRule(center, alpha)
    if rule == "mgrawa":
        return GrawaRule(center, alpha)
    if rule == "lgrawa":
        if not layers:
            raise ValueError("LGRAWA needs the model's layers")
        return GrawaRule(center, alpha, layers, lo)
    if rule == "lsgd":
        return LeaderRule(center, alpha, loss_decay=loss_decay, lam_g=lam_g, global_every=global_every)
    raise ValueError(f"no center rule for method {method!r}")
