"""Learning-rate schedules over a worker's own local steps."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str = "cosine",
                  warmup_steps: int = 0) -> float:
    """lr at local step `step` (0-based) of `total_steps`: linear warm-up, then cosine or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")
