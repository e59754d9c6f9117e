"""prune_core: data-aware structured pruning and retraining for torchvision-style CNNs.

The data path, top to bottom:
    data.ImageSet → criteria (rank) → surgery.prune_to_level (prune) → retrain.train (retrain)
    → measure.evaluate (validate) → model_format.save_model (store)
`cycle.run_cycle` chains them; `level_search.search_level` picks the level automatically.
No web, SQL or daemon code lives here.
"""
from .architectures import ARCHS, build_model
from .criteria import CRITERIA, Criterion, get_criterion, parse_criteria, register
from .cycle import CycleConfig, CycleResult, adaptation, run_cycle
from .data import DataError, ImageSet, batches, decode_image, load_image_folder, split_holdout
from .device import pick_device
from .level_search import Probe, search_level
from .measure import Accuracy, agreement, count_macs, count_params, evaluate
from .model_format import Lineage, ModelCard, ModelFormatError, load_model, read_card, save_model
from .retrain import TrainConfig, TrainResult, train
from .surgery import ALLOCATIONS, PruneOutcome, PruneSpec, parse_allocations, prune_to_level

__all__ = [
    "ARCHS", "build_model", "CRITERIA", "Criterion", "get_criterion", "parse_criteria", "register", "CycleConfig", "CycleResult",
    "adaptation", "run_cycle", "DataError", "ImageSet", "batches", "decode_image", "load_image_folder", "split_holdout",
    "pick_device", "Probe", "search_level", "Accuracy", "agreement", "count_macs", "count_params", "evaluate",
    "Lineage", "ModelCard", "ModelFormatError", "load_model", "read_card", "save_model", "TrainConfig",
    "TrainResult", "train", "ALLOCATIONS", "PruneOutcome", "PruneSpec", "parse_allocations", "prune_to_level",
]
