"""Feedback for past predictions: a reward and/or the true label, joined to the version that answered.

The agent remembers recent predictions (id → model, version, top-1 class) in a bounded, expiring
log. Feedback names a prediction id and carries a ``reward`` (a finite number within the configured
range; 0/1 for binary outcomes) and/or a ``label`` (a class index or one of the manifest's label
names). It is validated precisely (unknown or expired id, wrong type, out of range, feedback given
twice) and summed per model version; the monitor drains the sums into each window's ``feedback``
field, so they reach the fleet through the outbox like everything else.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeserve.contract import FeedbackSummary
from edgeserve.errors import InvalidInputError

__all__ = ["FeedbackLog", "Prediction"]


@dataclass
class Prediction:
    model: str
    version: str
    at: float
    top1: int | None
    labels: Sequence[str] | None
    answered: bool = False


@dataclass
class _Sums:
    count: int = 0
    reward_sum: float = 0.0
    reward_sumsq: float = 0.0
    correct: int = 0
    labeled: int = 0
    rewarded: int = 0


def _top1(outputs: Mapping[str, np.ndarray]) -> int | None:
    if len(outputs) != 1:
        return None
    scores = np.asarray(next(iter(outputs.values())))
    if scores.ndim == 0 or scores.shape[0] != 1 or scores[0].size < 2:
        return None
    return int(np.argmax(scores[0].reshape(-1)))


class FeedbackLog:
    def __init__(self, capacity: int = 100_000, ttl_s: float = 7 * 86400,
                 reward_range: tuple[float, float] = (-1e9, 1e9)) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.reward_range = reward_range
        self._log: OrderedDict[str, Prediction] = OrderedDict()
        self._sums: dict[tuple[str, str], _Sums] = {}
        self._lock = threading.Lock()

    def record(self, request_id: str, model: str, version: str,
               outputs: Mapping[str, np.ndarray], labels: Sequence[str] | None = None) -> None:
        """Remember a single-sample prediction so feedback can be joined to it later."""
        entry = Prediction(model, version, time.time(), _top1(outputs), labels)
        with self._lock:
            self._log[request_id] = entry
            while len(self._log) > self.capacity:
                self._log.popitem(last=False)

    def _reward(self, reward: Any) -> float | None:
        if reward is None:
            return None
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise InvalidInputError(f"reward must be a number, got {type(reward).__name__} "
                                    f"{reward!r}")
        value = float(reward)
        low, high = self.reward_range
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidInputError(f"reward {reward!r} is out of range; expected a finite "
                                    f"number within [{low:g}, {high:g}]")
        return value

    @staticmethod
    def _label(label: Any, entry: Prediction) -> int | None:
        if label is None:
            return None
        if isinstance(label, str):
            if not entry.labels or label not in entry.labels:
                known = ", ".join(entry.labels[:20]) if entry.labels else "none"
                raise InvalidInputError(f"label {label!r} is not one of the model's labels "
                                        f"({known})")
            return list(entry.labels).index(label)
        if isinstance(label, bool) or not isinstance(label, int):
            raise InvalidInputError(f"label must be a class index (int) or a label name, got "
                                    f"{type(label).__name__} {label!r}")
        classes = len(entry.labels) if entry.labels else None
        if label < 0 or (classes is not None and label >= classes):
            raise InvalidInputError(f"label {label} is out of range; expected 0.."
                                    f"{(classes or 1) - 1}")
        return label

    def add(self, request_id: str, reward: Any = None, label: Any = None,
            model: str | None = None) -> Prediction:
        """Attach feedback to a past prediction; raises InvalidInputError on anything wrong
        (``model``, when given, must be the model that made the prediction)."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidInputError("feedback needs the prediction id (a non-empty string) "
                                    "returned with the prediction")
        if reward is None and label is None:
            raise InvalidInputError("feedback needs a reward, a label, or both")
        value = self._reward(reward)
        with self._lock:
            entry = self._log.get(request_id)
            if entry is None or time.time() - entry.at > self.ttl_s:
                raise InvalidInputError(f"unknown or expired prediction id {request_id!r}; "
                                        "feedback must name a recent prediction of this agent")
            if model is not None and entry.model != model:
                raise InvalidInputError(f"prediction {request_id!r} was made by model "
                                        f"{entry.model!r}, not {model!r}")
            index = self._label(label, entry)
            if entry.answered:
                raise InvalidInputError(f"prediction {request_id!r} already has feedback")
            entry.answered = True
            sums = self._sums.setdefault((entry.model, entry.version), _Sums())
            sums.count += 1
            if value is not None:
                sums.rewarded += 1
                sums.reward_sum += value
                sums.reward_sumsq += value * value
            if index is not None:
                sums.labeled += 1
                sums.correct += int(entry.top1 is not None and entry.top1 == index)
        return entry

    def drain(self) -> dict[tuple[str, str], FeedbackSummary]:
        """Feedback summed per (model, version) since the last drain (for the next window)."""
        with self._lock:
            sums, self._sums = self._sums, {}
        return {key: FeedbackSummary(count=s.count, reward_sum=s.reward_sum,
                                     reward_sumsq=s.reward_sumsq, correct=s.correct,
                                     labeled=s.labeled, rewarded=s.rewarded)
                for key, s in sums.items()}
