"""Local steps of a worker on flat parameter/gradient buffers (torch.optim.SGD semantics).

EASGD uses plain SGD, EAMSGD Nesterov momentum with rate delta (Algorithm 2).
"""

from __future__ import annotations

import torch


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A state tensor for saving: one copy, in host memory (a GPU state is not duplicated there)."""
    return t.detach().to("cpu", copy=True)


class SGDStep:
    """x <- x - lr * (g + wd x), with optional (Nesterov) momentum delta, like torch.optim.SGD.

    Works in place on flat buffers; `grad` is used as scratch (it is zeroed before the next step
    anyway), so a step allocates nothing.
    """

    def __init__(self, params: torch.Tensor, *, momentum: float = 0.0, nesterov: bool = True,
                 weight_decay: float = 0.0):
        self.momentum = momentum
        self.nesterov = nesterov and momentum > 0
        self.weight_decay = weight_decay
        self.buf = torch.zeros_like(params) if momentum > 0 else None
        self._started = False

    def step(self, params: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        if self.weight_decay:
            grad.add_(params, alpha=self.weight_decay)
        if self.buf is not None:
            if self._started:
                self.buf.mul_(self.momentum).add_(grad)
            else:  # torch.optim.SGD initialises the buffer with the first gradient
                self.buf.copy_(grad)
                self._started = True
            if self.nesterov:
                grad.add_(self.buf, alpha=self.momentum)
            else:
                grad.copy_(self.buf)
        params.add_(grad, alpha=-lr)

    def state_dict(self) -> dict:
        return {"momentum_buffer": None if self.buf is None else _host_copy(self.buf), "started": self._started}

    def load_state_dict(self, state: dict) -> None:
        if self.buf is not None and state.get("momentum_buffer") is not None:
            self.buf.copy_(state["momentum_buffer"])
            self._started = bool(state.get("started", True))


class AdamWStep:
    """AdamW (Loshchilov & Hutter 2019) on flat buffers, like torch.optim.AdamW."""

    def __init__(self, params: torch.Tensor, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.m = torch.zeros_like(params)
        self.v = torch.zeros_like(params)
        self.t = 0

    def step(self, params: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        self.t += 1
        params.mul_(1 - lr * self.weight_decay)  # decoupled weight decay
        self.m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias1 = 1 - self.beta1 ** self.t
        bias2 = 1 - self.beta2 ** self.t
        denom = (self.v / bias2).sqrt_().add_(self.eps)
        params.addcdiv_(self.m, denom, value=-lr / bias1)

    def state_dict(self) -> dict:
        return {"m": _host_copy(self.m), "v": _host_copy(self.v), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
        self.t = int(state["t"])


def sam_perturbation(grad: torch.Tensor, rho: float, eps: float = 1e-12) -> torch.Tensor:
    """SAM (Foret et al. 2021): the ascent step e = rho g / ||g||. The descent step then uses
    the gradient taken at x + e, applied to x."""
    return grad * (rho / (grad.norm() + eps))


def lars_trust_ratios(params: torch.Tensor, grad: torch.Tensor, layers: list[tuple[int, int]], *,
                      eta: float = 1e-3, weight_decay: float = 0.0, eps: float = 1e-12) -> torch.Tensor:
    """LARS (You et al. 2017): per-layer local learning rates eta ||x|| / (||g|| + wd ||x||);
    1 where a layer's weights or gradient are zero. Tensor ops only, on the parameters' device:
    a comparison or .item() on a norm would wait for the GPU twice per layer per step, and the
    norms of all layers are one multi-tensor kernel on a GPU (torch's foreach ops, as its
    optimizers use; on the CPU the same per-layer norms)."""
    w = torch.stack(torch._foreach_norm([params[lo:hi] for lo, hi in layers]))
    g = torch.stack(torch._foreach_norm([grad[lo:hi] for lo, hi in layers]))
    return torch.where((w > eps) & (g > eps), eta * w / (g + weight_decay * w), torch.ones_like(w))


class LARSStep:
    """LARS (You et al. 2017): SGD (with the same optional Nesterov/heavy-ball momentum) in which
    each layer's gradient, weight decay included, is scaled by its trust ratio before the momentum:

        g_l <- eta ||x_l|| / (||g_l|| + wd ||x_l||) * (g_l + wd x_l),   then SGDStep with lr

    so a layer moves about lr * eta * ||x_l|| per step whatever its gradient's scale. Layers with
    zero weights or gradient (e.g. zero-initialised biases) keep ratio 1."""

    def __init__(self, params: torch.Tensor, layers: list[tuple[int, int]], *, eta: float = 1e-3,
                 momentum: float = 0.0, nesterov: bool = True, weight_decay: float = 0.0):
        self.layers, self.eta, self.weight_decay = layers, eta, weight_decay
        self.sgd = SGDStep(params, momentum=momentum, nesterov=nesterov)

    def step(self, params: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        ratios = lars_trust_ratios(params, grad, self.layers, eta=self.eta, weight_decay=self.weight_decay)
        if self.weight_decay:
            grad.add_(params, alpha=self.weight_decay)
        # 0-d tensors (no host sync), every layer in one multi-tensor call
        torch._foreach_mul_([grad[lo:hi] for lo, hi in self.layers], list(ratios.unbind()))
        self.sgd.step(params, grad, lr)

    def state_dict(self) -> dict:
        return self.sgd.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state)


class EntropySGD:
    """Entropy-SGD (Chaudhari et al. 2017): the outer step descends the local entropy, whose
    gradient gamma (x - mu) comes from L steps of stochastic gradient Langevin dynamics around x.

        x' <- x, mu <- x
        repeat L times:  x' <- x' - eta' (grad f(x') - gamma (x - x')) + sqrt(eta') eps_noise N(0, 1)
                         mu <- (1 - alpha) mu + alpha x'
        x <- x - lr gamma (x - mu)

    gamma grows each outer step ("scoping"): gamma_t = gamma0 (1 + gamma1)^t.

    The noise comes from a generator on the parameters' device (`device`, or the first tensor
    `gradient` gets): torch.randn cannot draw with a CPU generator into a CUDA tensor. The same
    seed on a GPU gives other numbers than on the CPU (another generator algorithm).
    """

    def __init__(self, *, langevin_steps: int = 5, langevin_lr: float = 0.1, gamma0: float = 0.03,
                 gamma1: float = 1e-3, noise: float = 1e-4, alpha: float = 0.75, seed: int = 0,
                 device: torch.device | str | None = None):
        if langevin_steps < 1:
            raise ValueError(f"Entropy-SGD needs at least one Langevin step, got {langevin_steps}")
        self.L, self.eta, self.gamma0, self.gamma1 = langevin_steps, langevin_lr, gamma0, gamma1
        self.noise, self.alpha = noise, alpha
        self.t = 0
        self.seed = seed
        self.gen: torch.Generator | None = None
        self._saved: dict | None = None  # a loaded generator state, for a generator not made yet
        self.device = None if device is None else torch.device(device)
        if self.device is not None:
            self._generator(self.device)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.gen is None:
            self.gen = torch.Generator(device=device).manual_seed(self.seed)
            # a state saved on another kind of device does not fit this generator (a CPU state is
            # 5056 bytes, a CUDA one a seed and an offset); its numbers differed anyway: seed it
            if self._saved is not None and self._saved["device"] == device.type:
                self.gen.set_state(self._saved["gen"].cpu())  # a loader may have mapped it to the GPU
            self._saved = None
        return self.gen

    @property
    def gamma(self) -> float:
        return self.gamma0 * (1 + self.gamma1) ** self.t

    def gradient(self, params: torch.Tensor, grad_at) -> torch.Tensor:
        """The local-entropy gradient gamma (x - mu) at `params` (a new tensor); advances the
        gamma schedule. `grad_at(point)` returns a minibatch gradient of f at `point`."""
        gamma = self.gamma
        x_prime = params.clone()
        mu = params.clone()
        for _ in range(self.L):
            g = grad_at(x_prime) - gamma * (params - x_prime)
            x_prime.sub_(g, alpha=self.eta)
            if self.noise:
                x_prime.add_(torch.randn(x_prime.shape, generator=self._generator(x_prime.device),
                                         dtype=x_prime.dtype, device=x_prime.device),
                             alpha=(self.eta ** 0.5) * self.noise)
            mu.mul_(1 - self.alpha).add_(x_prime, alpha=self.alpha)
        self.t += 1
        return (params - mu).mul_(gamma)

    def step(self, params: torch.Tensor, grad_at, lr: float) -> None:
        """The plain outer step x <- x - lr gamma (x - mu)."""
        params.sub_(self.gradient(params, grad_at), alpha=lr)

    def state_dict(self) -> dict:
        """The scoping step t and the noise generator's state: Generator.get_state gives a CPU
        ByteTensor whatever the generator's device (and set_state takes only that)."""
        if self.gen is None:
            return {"t": self.t, "generator": self._saved}
        return {"t": self.t, "generator": {"device": self.gen.device.type, "gen": self.gen.get_state()}}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        # made again at the next draw, from the seed or the saved state (None: none drawn yet)
        self.gen, self._saved = None, state.get("generator")
        if self.device is not None:
            self._generator(self.device)
