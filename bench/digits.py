"""The digits CNN used by the converter tests and bench/convert.py: trained in seconds on
scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Digits", "train_digits"]


@dataclass(frozen=True)
class Digits:
    """The trained digits CNN and its data (NCHW float32 images in [0, 1])."""

    module: Any
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def accuracy(self) -> float:
        import torch

        with torch.no_grad():
            logits = self.module(torch.from_numpy(self.x_test)).numpy()
        return float((logits.argmax(1) == self.y_test).mean())


def train_digits(seed: int = 0, epochs: int = 12) -> Digits:
    """A small CNN on the 8x8 digits (about 3 s on two cores, ~98 % held-out accuracy)."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:1400], order[1400:]
    module = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 16, 96), nn.ReLU(), nn.Linear(96, 10))
    optimizer = torch.optim.Adam(module.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train].astype(np.int64))
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            batch = perm[i:i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(xt[batch]), yt[batch]).backward()
            optimizer.step()
    return Digits(module.eval(), x[train], y[train], x[test], y[test])
