"""prune_core: data-aware structured pruning and retraining for torchvision-style CNNs.

The data path, top to bottom:
    data.ImageSet → criteria (rank) → surgery.prune_to_level (prune) → retrain.train (retrain)
    → measure.evaluate (validate) → model_format.save_model (store)
`cycle.run_cycle` chains them; `level_search.search_level` picks the level automatically.
No web, SQL or daemon code lives here.

The names below are imported on first use (PEP 562), so `import prune_core.options` or the
`edgetune` parser does not pay for torch; `from prune_core import run_cycle` works as usual.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "architectures": ("ARCHS", "build_model"),
    "criteria": ("CRITERIA", "Criterion", "get_criterion", "parse_criteria", "register"),
    "cycle": ("CycleConfig", "CycleResult", "adaptation", "run_cycle"),
    "data": ("DataError", "ImageSet", "batches", "decode_image", "load_image_folder", "split_holdout", "split_judging"),
    "device": ("pick_device",),
    "level_search": ("Probe", "search_level"),
    "measure": ("Accuracy", "Comparison", "agreement", "compare", "count_macs", "count_params", "evaluate"),
    "model_format": ("Lineage", "ModelCard", "ModelFormatError", "load_model", "read_card", "save_model"),
    "retrain": ("TrainConfig", "TrainResult", "train"),
    "surgery": ("ALLOCATIONS", "PruneOutcome", "PruneSpec", "parse_allocations", "prune_to_level"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:  # not an export: let `from prune_core import data` find the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

