"""A worker's local training: its data order, learning-rate schedule, gradients and local step.

Shared by every method; the method decides what happens between steps (an exchange with the
center, an allreduce of gradients or of parameters)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from hpcopt.config import Config
from hpcopt.models import FlatModel
from hpcopt.optim.grawa import layer_bounds, layer_norms
from hpcopt.optim.local import AdamWStep, EntropySGD, LARSStep, SGDStep, sam_perturbation
from hpcopt.optim.schedule import learning_rate


def make_local_step(cfg: Config, params: torch.Tensor, layers: list[tuple[int, int]] | None = None):
    """The step that turns a gradient into an update: AdamW, LARS (per-layer trust ratios on
    SGD; needs the model's `layers`), or SGD (also under SAM and Entropy-SGD, which change the
    gradient it gets)."""
    if cfg.train.local == "adamw":
        return AdamWStep(params, weight_decay=cfg.train.weight_decay)
    if cfg.train.local == "lars":
        return LARSStep(params, layers, eta=cfg.train.lars_eta, momentum=cfg.momentum, nesterov=True,
                        weight_decay=cfg.train.weight_decay)
    return SGDStep(params, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.train.weight_decay)


def _loss(module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    loss_of = getattr(module, "loss", None)  # a user model may define loss(x, y)
    return loss_of(xb, yb) if loss_of else F.cross_entropy(module(xb), yb)


class StepLosses:
    """The step losses the divergence guard and the reports read, one step late. Reading a GPU
    loss at once (.item()) makes the host wait for every kernel queued so far, so the host could
    never queue a step while the GPU runs the previous one. Here a step's loss is copied to pinned
    host memory behind that step's kernels and read after the next step is queued, when it is
    long there. The lag is the same on the CPU, so the CPU tests run the GPU's order: a NaN loss
    is seen after one more step was taken from the NaN parameters (the worker then restarts
    from the center, which overwrites them)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.slot = torch.empty((), dtype=torch.float32, pin_memory=True)
            self.ready = torch.cuda.Event()
        self.pending: tuple[int, torch.Tensor] | None = None

    def push(self, step: int, loss: torch.Tensor) -> tuple[int, float] | None:
        """Step `step`'s loss (on the device) in; the previous step's (step, value) out, if any."""
        previous = self.take()
        if self.cuda:  # (the slot was read by take(): the copy may overwrite it)
            self.slot.copy_(loss, non_blocking=True)
            self.ready.record()
            loss = self.slot
        self.pending = (step, loss)
        return previous

    def take(self) -> tuple[int, float] | None:
        """The pending step's (step, value), waiting on a GPU for that step only; None if none."""
        if self.pending is None:
            return None
        (step, loss), self.pending = self.pending, None
        if self.cuda:
            self.ready.synchronize()
        return step, float(loss)

    def clear(self) -> None:
        """Forget the pending loss (taken from parameters a restart has just overwritten)."""
        self.pending = None


class LocalTrainer:
    def __init__(self, cfg: Config, worker_id: int, flat: FlatModel, data: dict):
        self.cfg, self.worker_id, self.flat = cfg, worker_id, flat
        self.device = device = flat.params.device  # the worker's GPU, when it has one
        self.x = torch.from_numpy(data["x_train"]).to(device)
        self.y = torch.from_numpy(data["y_train"]).to(device)
        n = len(self.x)
        self.batch = min(cfg.data.batch_size, n)
        self.steps_per_epoch = n // self.batch  # full batches only
        self.total = max(1, round(cfg.train.epochs * self.steps_per_epoch))
        self.warmup = round(cfg.train.warmup_epochs * self.steps_per_epoch)
        self.local = make_local_step(cfg, flat.params, layer_bounds(flat.layout()))
        self.module = flat.module
        self.module.train()
        self.perm = None
        self.assign(worker_id)
        self.step_index = 0  # the local step whose gradient flat.grads holds
        # LGRAWA reports per-layer gradient norms: taken at the same steps as the worker's
        # whole-model gradient norm (the last step before each exchange), before the local
        # step uses flat.grads as scratch
        self.layers = layer_bounds(flat.layout()) if cfg.run.method == "lgrawa" else None

    def assign(self, worker_id: int) -> None:
        """This worker's id, and what follows from it: its data order and its Langevin noise. A
        joiner gets ready before it knows its id (its device and first pass must not count
        against the servers' clock) and is assigned it once admitted."""
        cfg, t = self.cfg, self.cfg.train
        self.worker_id = worker_id
        self.gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + worker_id)
        self.entropy = EntropySGD(langevin_steps=t.langevin_steps, langevin_lr=t.langevin_lr, gamma0=t.gamma0,
                                  gamma1=t.gamma1, noise=t.langevin_noise, seed=cfg.run.seed * 7919 + worker_id,
                                  device=self.device) \
            if t.local == "entropy-sgd" else None

    def lr(self, step: int) -> float:
        return learning_rate(step, self.total, self.cfg.train.lr, self.cfg.train.schedule, self.warmup)

    def gradient(self, step: int) -> torch.Tensor:
        """The gradient the local step uses (into flat.grads) for local step `step`'s minibatch:
        plain, at the SAM ascent point, or the local-entropy gradient. Returns the minibatch loss
        at the current parameters, a 0-d tensor on the device (nothing here waits for a GPU)."""
        self.step_index = step
        i = step % self.steps_per_epoch
        if i == 0 or self.perm is None:
            # drawn on the CPU (the same data order on any device) and moved once per epoch: a CPU
            # index into GPU data is copied over, and the GPU waited for, at every use
            self.perm = torch.randperm(len(self.x), generator=self.gen).to(self.device)
        idx = self.perm[i * self.batch:(i + 1) * self.batch]
        xb, yb = self.x[idx], self.y[idx]
        # the loss stays on the device: the divergence guard reads it a step later (StepLosses);
        # the other backward passes below keep theirs too (a NaN there makes NaN parameters,
        # which the worker checks before every exchange)
        loss = self._backward(xb, yb)
        params, grads = self.flat.params, self.flat.grads
        if self.cfg.train.local == "sam":  # Foret et al. 2021: descend with the gradient at x + e
            e = sam_perturbation(grads, self.cfg.train.sam_rho)
            params.add_(e)
            self._backward(xb, yb)
            params.sub_(e)
        elif self.entropy is not None:
            x = params.clone()

            def grad_at(point):  # a fresh minibatch per Langevin step, as in Chaudhari et al.
                params.copy_(point)
                # from the CPU generator, as the epoch's order; non_blocking: no wait for the GPU
                j = torch.randint(len(self.x), (self.batch,), generator=self.gen).to(self.device, non_blocking=True)
                self._backward(self.x[j], self.y[j])
                return grads.clone()

            g = self.entropy.gradient(x, grad_at)
            params.copy_(x)
            grads.copy_(g)
        return loss

    def initial_loss(self) -> float:
        """The loss of the untrained model that the run's seed builds, on the first training
        batch: the same for every worker of a run, whenever it starts (a joiner, or a worker
        resumed without its state, starts from a trained center whose loss is far lower, and
        ordinary noise would look like divergence against that)."""
        from hpcopt.models import build_model

        cfg = self.cfg
        # every random draw (the build, a user model's dropout) from the seed, and none of the
        # training's: the RNG states, on the CPU and this GPU, are as they were afterwards
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.run.seed)
            model = build_model(cfg.model.name, cfg.model.kwargs).to(self.device).eval()
            with torch.no_grad(), self._autocast():  # in the precision the training losses have
                return float(_loss(model, self.x[:self.batch], self.y[:self.batch]))

    def warm_up(self) -> None:
        """On a GPU, before the servers' liveness clock starts: one forward and backward of the
        training model itself (no second copy in GPU memory), so that the backward's kernels,
        cuDNN's choice of algorithms and autograd's device thread are loaded. In eval mode (no
        batch statistics move), drawing from forked RNGs, gradients zeroed: nothing of the
        training changes."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self._backward(self.x[:self.batch], self.y[:self.batch])
        finally:
            self.module.train(was_training)
            self.flat.zero_grad()

    def _autocast(self):
        """train.precision bf16: the forward pass and the loss in bfloat16 where autocast deems
        it safe (matmuls, convolutions; cross-entropy runs in float32). Parameters, gradients
        and so everything exchanged stay float32: autocast casts copies, and the gradients of
        those copies accumulate into the float32 flat buffer."""
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _backward(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Gradient of the minibatch loss into flat.grads; returns the loss, on the device."""
        with self._autocast():
            loss = _loss(self.module, xb, yb)
        self.flat.zero_grad()
        loss.backward()  # outside autocast, as torch recommends: the backward ops follow the forward's dtypes
        return loss.detach().reshape(())  # (a user loss of shape [1] backpropagates too)

    def apply(self, lr: float) -> None:
        """The local step with the gradient in flat.grads."""
        nxt = self.step_index + 1
        if self.layers is not None and (nxt % self.cfg.easgd.tau == 0 or nxt == self.total):
            self.flat.layer_grad_norms[:] = layer_norms(self.flat.grads, self.layers).double().cpu().numpy()
        self.local.step(self.flat.params, self.flat.grads, lr)

    def reset_local_state(self) -> None:
        """Forget the local step's state (momentum, Adam moments), e.g. after a divergence."""
        self.local = make_local_step(self.cfg, self.flat.params, layer_bounds(self.flat.layout()))

    def state_dict(self) -> dict:
        """What a resumed worker needs to go on exactly: local step state and data order."""
        state = {"local": self.local.state_dict(), "local_kind": self.cfg.train.local, "gen": self.gen.get_state(),
                 "perm": None if self.perm is None else self.perm.cpu(),
                 "torch_rng": torch.get_rng_state()}
        if self.entropy is not None:  # its scope gamma_t and Langevin noise
            state["entropy"] = self.entropy.state_dict()
        if self.device.type == "cuda":  # a model's own randomness (dropout) draws from the GPU's generator
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> str | None:
        """Returns a note when the local step's own state could not be taken (a resume with another
        train.local, or its settings changed): the worker keeps its parameters, step and data
        order, and its local step starts fresh, instead of every worker crashing on a KeyError."""
        note = None
        saved = state.get("local_kind")  # (states saved before it have none)
        try:
            if saved is not None and saved != self.cfg.train.local:
                raise ValueError(f"it was saved by train.local = {saved!r}")
            self.local.load_state_dict(state["local"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            self.reset_local_state()
            note = (f"its saved local-step state does not fit train.local = {self.cfg.train.local!r} "
                    f"({e if isinstance(e, ValueError) else type(e).__name__ + ': ' + str(e)}): the local "
                    f"step starts fresh; parameters, step and data order are resumed")
        self.gen.set_state(state["gen"])
        self.perm = None if state["perm"] is None else state["perm"].to(self.device)
        torch.set_rng_state(state["torch_rng"])
        if self.entropy is not None and "entropy" in state:  # (states saved before it have none)
            self.entropy.load_state_dict(state["entropy"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        return note
