"""How long a training run is, in epochs and steps: one rule for `retrain.train` and for the cost model
(`cost`), kept free of torch so the daemon can predict without importing it."""
from __future__ import annotations

import math


def schedule(samples: int, batch_size: int, epochs: int, min_steps: int = 0) -> tuple[int, int]:
    """(epochs, batches per epoch) of a run on `samples` samples: `min_steps` stretches small sets
    to more epochs."""
    per_epoch = math.ceil(samples / batch_size)
    return max(epochs, math.ceil(min_steps / per_epoch)), per_epoch
