"""Small real models for the demo, the benchmarks and end-to-end tests (torch, imported lazily).

All are CNNs on scikit-learn's bundled 8x8 digits (no download), trained in seconds:

* :func:`train_digits` — the CNN; ``width`` scales it (a wider one is a better v2).
* :func:`slow_variant` — the same answers, but every request also runs a heavy branch whose
  result is multiplied by zero: several times slower, otherwise identical (a latency regression).
* :func:`erroring_variant` — fails at run time on images with more ink than any calibration image
  (an out-of-range gather, as a model broken for out-of-distribution inputs would).
* :func:`scrambled_variant` — a model trained on permuted labels: confident, accurate in its own
  terms, and disagreeing with the real one on most inputs.
* :func:`retrain_head` / :func:`fine_tune` — the two common updates at the edge: only the
  classification head retrained (every other weight bit-identical), or every weight fine-tuned
  (the model deltas benchmark and tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Digits", "erroring_variant", "fine_tune", "ink", "retrain_head", "scrambled_variant",
           "slow_variant", "train_digits"]


@dataclass(frozen=True)
class Digits:
    """A trained digits model and its data (NCHW float32 images in [0, 1], int labels)."""

    module: Any
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def accuracy(self) -> float:
        return float((self.predict(self.x_test).argmax(1) == self.y_test).mean())

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return np.asarray(self.module(torch.from_numpy(x)).numpy())


def _data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(seed).permutation(len(x))
    return x, y.astype(np.int64), order


def train_digits(seed: int = 0, epochs: int = 12, width: int = 16,
                 label_permutation: np.ndarray | None = None) -> Digits:
    """A small CNN on the 8x8 digits (seconds on two cores, ~97-98 % held-out accuracy)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x, y, order = _data(0)  # one fixed split, so versions are comparable
    if label_permutation is not None:
        y = label_permutation[y]
    train, test = order[:1400], order[1400:]
    module = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * width * 16, 96), nn.ReLU(), nn.Linear(96, 10))
    optimizer = torch.optim.Adam(module.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=generator)
        for i in range(0, len(xt), 64):
            batch = perm[i:i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(xt[batch]), yt[batch]).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return Digits(module.eval(), x[train], y[train], x[test], y[test])


def ink(x: np.ndarray) -> np.ndarray:
    """Total ink per image (what :func:`erroring_variant` trips on)."""
    return np.asarray(x.reshape(len(x), -1).sum(axis=1))


def slow_variant(base: Digits, channels: int = 192, depth: int = 4) -> Digits:
    """``base`` plus a heavy branch multiplied by zero: same outputs, far more work."""
    import torch
    from torch import nn

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base.module
            layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU()]
            for _ in range(depth - 1):
                layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
            self.heavy = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 64, 10))
            self.register_buffer("zero", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.zero * self.heavy(x)  # type: ignore[no-any-return]

    return Digits(Slow().eval(), base.x_train, base.y_train, base.x_test, base.y_test)


def erroring_variant(base: Digits, max_ink: float) -> Digits:
    """``base``, but inference fails on images with more than ``max_ink`` total ink."""
    import torch
    from torch import nn

    class Erroring(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base.module
            self.register_buffer("offset", torch.zeros(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # index 0 for normal images, far out of range for heavy ones: the runtime refuses
            index = (x.sum(dim=(1, 2, 3)) > max_ink).long() * 1000
            return self.base(x) + self.offset[index].unsqueeze(1)  # type: ignore[no-any-return,index]

    return Digits(Erroring().eval(), base.x_train, base.y_train, base.x_test, base.y_test)


def scrambled_variant(seed: int = 1) -> Digits:
    """A CNN trained on permuted labels: confident, and disagreeing with the real digits."""
    permutation = np.roll(np.arange(10), 3)
    return train_digits(seed=seed, label_permutation=permutation)


def _train(base: Digits, params: Any, epochs: int, lr: float, seed: int) -> Digits:
    import copy

    import torch
    from torch import nn

    torch.manual_seed(seed)
    module = copy.deepcopy(base.module).train()
    parameters = params(module)
    optimizer = torch.optim.Adam(parameters, lr)
    xt, yt = torch.from_numpy(base.x_train), torch.from_numpy(base.y_train)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=generator)
        for i in range(0, len(xt), 64):
            batch = perm[i:i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(xt[batch]), yt[batch]).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return Digits(module.eval(), base.x_train, base.y_train, base.x_test, base.y_test)


def retrain_head(base: Digits, seed: int = 1, epochs: int = 3) -> Digits:
    """``base`` with only its last layer (the classification head) re-initialised and retrained;
    every other weight stays bit-identical."""
    import torch

    def head(module: Any) -> list[Any]:
        last = module[-1]
        torch.manual_seed(seed)
        last.reset_parameters()
        return list(last.parameters())

    return _train(base, head, epochs, 3e-3, seed)


def fine_tune(base: Digits, seed: int = 1, epochs: int = 1) -> Digits:
    """``base`` with every weight trained a little further (a full fine-tune)."""
    return _train(base, lambda module: list(module.parameters()), epochs, 1e-3, seed)
