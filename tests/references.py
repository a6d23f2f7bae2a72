"""NumPy references shared by several tests."""

import numpy as np


def entropy_sgd_step(x: np.ndarray, grad, gamma: float, lr: float, langevin_steps: int,
                     langevin_lr: float, alpha: float = 0.75) -> np.ndarray:
    """One noiseless Entropy-SGD outer step (Chaudhari et al. 2017): x - lr gamma (x - mu)."""
    xp, mu = x.copy(), x.copy()
    for _ in range(langevin_steps):
        xp = xp - langevin_lr * (grad(xp) - gamma * (x - xp))
        mu = (1 - alpha) * mu + alpha * xp
    return x - lr * gamma * (x - mu)
