"""Evaluating a model (or a flat copy of the center) on a data set."""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from hpcopt.models import FlatModel


@torch.no_grad()
def evaluate(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `module` on (x, y). A module with its own
    `loss(x, y)` method gets that loss and accuracy NaN."""
    was_training = module.training
    module.eval()
    if hasattr(module, "loss"):
        value = module.loss(x, y).item()
        module.train(was_training)
        return value, float("nan")
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = module(x[i:i + batch])
        loss_sum += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    module.train(was_training)
    return loss_sum / len(x), correct / len(x)


class Evaluator:
    """Evaluates copies of the center in a background thread, so the server keeps serving
    exchanges meanwhile (torch releases the GIL while it computes). Only the calling thread
    touches MPI and HDF5; the thread only runs torch."""

    def __init__(self, model: FlatModel, x_test: np.ndarray, y_test: np.ndarray):
        self.model = model
        self.x = torch.from_numpy(x_test)
        self.y = torch.from_numpy(y_test)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._results: list[tuple] = []
        self._unreported: list[tuple] = []
        self._error: BaseException | None = None
        self.last: tuple | None = None  # (exchanges, time, test_loss, test_accuracy)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, center: np.ndarray, exchanges: int, t: float) -> None:
        """Start evaluating `center` (this object keeps it; pass a copy)."""
        self.wait()

        def run():
            try:
                self.model.params.copy_(torch.from_numpy(center))
                loss, acc = evaluate(self.model.module, self.x, self.y)
                with self._lock:
                    self._results.append((exchanges, t, loss, acc))
                    self._unreported.append((exchanges, t, loss, acc))
                    self.last = (exchanges, t, loss, acc)
            except BaseException as e:  # re-raised in the serving thread
                self._error = e

        self._thread = threading.Thread(target=run, name="hpcopt-eval", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise RuntimeError("evaluating the center failed") from self._error

    def new_results(self) -> list[tuple]:
        """Results not yet reported (for progress lines)."""
        if self._error is not None:
            self.wait()
        with self._lock:
            out, self._unreported = self._unreported, []
        return out

    def take(self) -> list[tuple]:
        """Results not yet written to the trajectory file."""
        with self._lock:
            out, self._results = self._results, []
        return out
