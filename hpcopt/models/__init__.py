"""Reference models and the loader for user models ('module:function')."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .flat import FlatModel  # noqa: F401  (re-exported)


class CNN1D(nn.Module):
    """The 1D CNN of the MNIST-1D paper (Greydanus 2020): three stride-2 convolutions with
    `channels` channels and ReLU, then one linear layer; 5,210 parameters for 40-sample inputs."""

    def __init__(self, input_size: int = 40, classes: int = 10, channels: int = 25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        length = input_size
        for k in (5, 3, 3):
            length = (length + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * length, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(-1, 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


class MLP(nn.Module):
    """A plain MLP: input -> hidden (ReLU) ... -> classes. `hidden` is a list of widths."""

    def __init__(self, input_size: int = 40, classes: int = 10, hidden: list | tuple = (100, 100)):
        super().__init__()
        layers, width = [], input_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


BUILTIN = {"cnn1d": CNN1D, "mlp": MLP}


def resolve(spec: str, what: str):
    """Import 'module:function'; errors name the spec and what it was for."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must be a built-in name or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


def build_model(name: str, kwargs: dict | None = None) -> nn.Module:
    """A built-in model by name, or the nn.Module a user factory 'module:function' returns."""
    kwargs = dict(kwargs or {})
    if name in BUILTIN:
        factory = BUILTIN[name]
    elif ":" in name:
        factory = resolve(name, "model")
    else:
        raise ValueError(f"model {name!r} is not a built-in ({', '.join(BUILTIN)}) nor 'module:function'")
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r} does not accept kwargs {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
