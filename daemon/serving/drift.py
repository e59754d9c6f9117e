"""When the world changes: is a class the served specialist was not trained for showing up?

A specialised model forgets the classes it stopped seeing, so it cannot notice them return. The
generalist (the version the device was first given) still can: it is run on a sample of traffic, its
calibrated probabilities feed its own prior estimate, and a class whose estimated share reaches
`appear_share` while the served model's card gave it less than `trained_share` is a new class.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from prune_core.card import ModelCard
from prune_core.label_shift import PriorTracker


@dataclass(frozen=True)
class DriftSettings:
    enabled: bool = True
    sample_every: int = 4  # run the generalist on every Nth served image
    window: int = 200  # generalist answers the estimate is made over
    min_samples: int = 40  # no verdict before this many
    appear_share: float = 0.1  # a class this frequent in traffic ...
    trained_share: float = 0.02  # ... that the specialist's prior gave less than this has appeared


@dataclass(frozen=True)
class Appeared:
    """The verdict: classes the specialist was not trained for, with their estimated shares."""

    classes: list[str]
    shares: list[float]

    def describe(self) -> str:
        return ", ".join(f"{c} at {s:.0%} of traffic" for c, s in zip(self.classes, self.shares))


class DriftWatch:
    """The generalist's prior estimate over a window of traffic, and the comparison with a specialist."""

    def __init__(self, generalist: ModelCard, settings: DriftSettings = DriftSettings()):
        self.s = settings
        self.card = generalist
        self.calibration = generalist.calibration()
        self.tracker = PriorTracker(np.asarray(generalist.prior()), window=settings.window, min_samples=settings.min_samples)
        self._lock = threading.Lock()

    def observe(self, logits: np.ndarray) -> None:
        """The generalist's logits for sampled traffic images (N×K)."""
        probs = self.calibration.apply(np.asarray(logits, dtype=np.float32))
        with self._lock:
            self.tracker.add(probs)

    def estimate(self) -> list[float] | None:
        with self._lock:
            q = self.tracker.estimate()
        return None if q is None else [float(v) for v in q]

    def appeared(self, specialist: ModelCard) -> Appeared | None:
        """The classes traffic now holds that `specialist` was not trained for; None while there are none
        (or too few samples). Only meaningful for a specialist of the generalist's classes."""
        q = self.estimate()
        if q is None or specialist.class_names != self.card.class_names:
            return None
        trained = specialist.prior()
        new = [i for i, share in enumerate(q) if share >= self.s.appear_share and trained[i] < self.s.trained_share]
        if not new:
            return None
        return Appeared([self.card.class_names[i] for i in new], [q[i] for i in new])

    def reset(self) -> None:
        with self._lock:
            self.tracker.reset()
