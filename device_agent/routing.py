"""Traffic splitting between versions of one model (A/B tests and bandits on the device).

Desired state may give a model several versions with weights. Each request is routed by weight;
with a request key (a user or session id) the choice is *sticky*: the key hashes to a fixed point
in [0, 1), so one user keeps one arm for as long as the weights stay the same. Without a key the
point is random. The response says which version answered, and telemetry is kept per version.
"""

from __future__ import annotations

import hashlib
import random
import threading
from bisect import bisect_right
from collections.abc import Mapping
from itertools import accumulate

from edgeserve.errors import ConfigError

__all__ = ["TrafficRouter"]


class TrafficRouter:
    def __init__(self, seed: int | None = None) -> None:
        self._tables: dict[str, tuple[list[str], list[float]]] = {}
        self._lock = threading.Lock()
        self._random = random.Random(seed)

    @property
    def active(self) -> bool:
        """Whether any model has a split (checked first on the predict hot path)."""
        return bool(self._tables)

    def set(self, model: str, weights: Mapping[str, float]) -> None:
        """Route ``model`` by ``weights`` (version → weight); empty clears the split."""
        if any(w < 0 for w in weights.values()):
            raise ConfigError(f"traffic weights for {model} must not be negative: {dict(weights)}")
        clean = {v: float(w) for v, w in weights.items() if w > 0}
        with self._lock:
            if not clean:
                self._tables.pop(model, None)
                return
            versions = sorted(clean)
            total = sum(clean.values())
            cumulative = list(accumulate(clean[v] / total for v in versions))
            cumulative[-1] = 1.0
            self._tables[model] = (versions, cumulative)

    def weights(self, model: str) -> dict[str, float]:
        with self._lock:
            table = self._tables.get(model)
        if table is None:
            return {}
        versions, cumulative = table
        previous = [0.0, *cumulative[:-1]]
        return {v: round(c - p, 12) for v, c, p in zip(versions, cumulative, previous, strict=True)}

    def choose(self, model: str, key: str | None = None) -> str | None:
        """The version to answer with, or None when the model has no split."""
        table = self._tables.get(model)
        if table is None:
            return None
        versions, cumulative = table
        if key is None:
            point = self._random.random()
        else:
            digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2**64
        return versions[min(bisect_right(cumulative, point), len(versions) - 1)]
