"""`edgetune` command line: init, train, prune, eval, info, export.

Every command prints JSON on stdout; errors are one line on stderr with exit status 2.
Importing this module (and building its parser) imports no torch: each command's arguments are
added when that command is parsed (`OneLineParser(configure=...)`) and each command imports what
it needs when it runs, so `edgetune --help` and the daemon's light commands start fast.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import argtypes
from .errors import UsageError
from .jsonsafe import finite
from .options import DEFAULT_LAST_SHARE, RetrainScope

if TYPE_CHECKING:
    from .data import ImageSet
    from .model_format import ModelCard
    from .retrain import TrainConfig

HOLDOUT = 0.2
Configure = Callable[[argparse.ArgumentParser], None]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to get help), not the whole usage block.

    `configure(parser)`, when given, adds the parser's arguments the first time it parses or shows
    its help: a subcommand whose help text names torch-backed choices (architectures, criteria)
    costs nothing until it is the one being run."""

    def __init__(self, *args, configure: Configure | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending = configure

    def ensure_configured(self) -> None:
        """Add the pending arguments now (once)."""
        if self._pending is not None:
            configure, self._pending = self._pending, None
            configure(self)

    def parse_known_args(self, args=None, namespace=None):
        self.ensure_configured()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.ensure_configured()
        return super().format_usage()

    def format_help(self) -> str:
        self.ensure_configured()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _emit(data: dict) -> None:
    print(json.dumps(finite(data), indent=2, default=float, allow_nan=False))


def _class_names(args) -> list[str]:
    if args.classes_from:
        root = Path(args.classes_from)
        if not root.is_dir():
            raise UsageError(f"--classes-from '{root}' is not a directory")
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    elif args.class_names:
        names = [n.strip() for n in args.class_names.split(",") if n.strip()]
    else:
        names = [str(i) for i in range(args.num_classes or 0)]
    if args.num_classes is not None and len(names) != args.num_classes:
        raise UsageError(f"{len(names)} class names given for --num-classes {args.num_classes}")
    if not names:
        raise UsageError("give --num-classes, --class-names or --classes-from")
    if len(set(names)) != len(names):
        raise UsageError("class names must be unique")
    return names


def cmd_init(args) -> dict:
    import torch

    from .architectures import arch_spec
    from .checkpoint import WeightsError, load_weights
    from .data import Preprocess
    from .model_format import ModelCard, save_model
    from .prunability import check_prunable

    names = _class_names(args)
    try:
        spec = arch_spec(args.arch, args.arch_kwargs)
        size = args.image_size or spec.image_size
        preprocess = Preprocess(size, args.resize_size, args.interpolation)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if size < spec.min_image_size:
        raise UsageError(f"{args.arch} needs --image-size of at least {spec.min_image_size}")
    out = Path(args.dir)
    if (out / "model.json").exists() and not args.force:
        raise UsageError(f"'{out}' already holds a model (use --force to overwrite)")
    torch.manual_seed(args.seed)
    model = spec.build(len(names))
    fit = None
    if args.weights:
        try:
            fit = load_weights(model, args.weights)
        except WeightsError as exc:
            raise UsageError(f"{exc} ({args.arch} with {len(names)} classes)") from None
    card = ModelCard(args.arch, len(names), names, size, resize_size=preprocess.resize_size,
                     interpolation=preprocess.interpolation, arch_kwargs=dict(args.arch_kwargs))
    trial = check_prunable(model, card)  # refuses, naming the layer, what cannot be pruned and stored
    card = save_model(model, card, out)
    for note in fit.notes if fit else []:
        print(f"edgetune init: note: {note}", file=sys.stderr)
    return {
        "dir": str(out), "arch": card.arch, "arch_kwargs": card.arch_kwargs, "num_classes": card.num_classes,
        "input_size": size, "resize_size": card.resize_size, "interpolation": card.preprocess.interpolation.value,
        "params": card.params, "macs": card.macs, "trial_prune_level": trial.level,
        **({"weights": {"tensors_loaded": fit.loaded, "renamed": fit.renamed, "untrained": fit.untrained, "notes": fit.notes}} if fit else {}),
    }


def _train_config(args) -> TrainConfig:
    from .retrain import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, flip=not args.no_flip,
        scope=args.retrain_scope, last_share=args.last_share,
    )


def _load_data(args, card: ModelCard) -> ImageSet:
    from .data import load_image_folder

    return load_image_folder(args.data, card.class_names, card.preprocess, skip_unknown=args.skip_unknown)


def _calibration_summary(card) -> dict:
    return {"temperature": card.temperature, "class_prior": dict(zip(card.class_names, card.prior()))}


def cmd_calibrate(args) -> dict:
    from .calibrate import calibrated_card
    from .device import pick_device
    from .model_format import load_model, save_model

    device = pick_device(args.device)
    model, card = load_model(args.dir, device)
    data = _load_data(args, card)
    card = calibrated_card(model, card, data, data.labels)
    save_model(model, card, args.dir)
    return {"dir": args.dir, "samples": len(data), **_calibration_summary(card)}


def cmd_train(args) -> dict:
    from .calibrate import calibrated_card
    from .data import split_holdout
    from .device import pick_device
    from .model_format import load_model, save_model
    from .retrain import train

    device = pick_device(args.device)
    model, card = load_model(args.dir, device)
    data = _load_data(args, card)
    train_set, held_set = split_holdout(data, HOLDOUT)
    started = time.monotonic()
    result = train(model, train_set, held_set, card.mean, card.std, _train_config(args), progress=not args.quiet)
    if held_set.labelled:  # calibration and the class prior, for serving under label shift
        card = calibrated_card(model, card, held_set, train_set.labels)
    save_model(model, card, args.dir)
    return {
        "calibration": _calibration_summary(card),
        "dir": args.dir,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "early_stop_epoch": result.early_stop_epoch,  # null: ran its whole schedule
        "clipped_steps": result.clipped_steps,  # steps whose gradient was scaled down to the clip norm
        "held_out_top1": result.best_score,
        "history": [vars(h) for h in result.history],
        "train_samples": len(train_set),
        "held_out_samples": len(held_set),
        "seconds": time.monotonic() - started,
    }


def cmd_prune(args) -> dict:
    from .cycle import CycleConfig, run_cycle
    from .data import split_holdout
    from .device import pick_device
    from .model_format import load_model, save_model

    device = pick_device(args.device)
    model, card = load_model(args.dir, device)
    data = _load_data(args, card)
    train_set, held_set = split_holdout(data, HOLDOUT)
    config = CycleConfig(
        level=args.level, criterion=args.criterion, allocation=args.allocation, finetune_before=args.finetune_before,
        fade_epochs=args.fade, tolerance=args.tolerance, round_to=args.round_to, train=_train_config(args),
    )

    def show_probe(probe) -> None:
        if not args.quiet:
            print(f"probe level={probe.level:.2f} top1={probe.accuracy:.4f} params={probe.params} feasible={probe.feasible} "
                  f"retrained={probe.retrain_epochs} kept={probe.kept_epoch} ({probe.seconds:.1f}s)", file=sys.stderr)

    result = run_cycle(model, card, train_set, held_set, config, on_probe=show_probe, progress=not args.quiet, parent=str(Path(args.dir).resolve()))
    save_model(result.model, result.card, args.out)
    return {"out": args.out, **result.summary}


def cmd_eval(args) -> dict:
    from .data import batches
    from .device import pick_device
    from .measure import evaluate
    from .model_format import load_model

    device = pick_device(args.device)
    model, card = load_model(args.dir, device)
    data = _load_data(args, card)
    acc = evaluate(model, batches(data, 256, card.mean, card.std, device=device))
    return {"dir": args.dir, "samples": len(data), **acc.to_dict(card.class_names)}


def cmd_info(args) -> dict:
    from .measure import count_macs, count_params
    from .model_format import load_model

    model, card = load_model(args.dir)
    layers = {name: plan.get("out_channels", plan.get("out_features", plan.get("num_features"))) for name, plan in card.channel_plan.items()}
    return {
        "dir": args.dir,
        "arch": card.arch,
        "num_classes": card.num_classes,
        "class_names": card.class_names,
        "input_size": card.input_size,
        "mean": card.mean,
        "std": card.std,
        "params": count_params(model),
        "macs": count_macs(model, card.input_size),
        "size_mb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20,
        "lineage": vars(card.lineage),
        "layers": layers,
    }


def cmd_export(args) -> dict:
    from .model_format import load_model
    from .onnx_export import export_onnx

    model, card = load_model(args.dir)
    diff = export_onnx(model, card.input_size, args.onnx, opset=args.opset)
    return {"dir": args.dir, "onnx": args.onnx, "opset": args.opset, "max_abs_diff_vs_torch": diff}


# ---- arguments: each command's are added when that command is parsed ----------------------
def _add_common(p: argparse.ArgumentParser, data: bool = True, training: bool = False) -> None:
    p.add_argument("dir", help="model directory")
    if data:
        p.add_argument("--data", required=True, help="ImageFolder: one sub-folder of images per class name")
        p.add_argument("--skip-unknown", action="store_true", help="ignore class folders the model does not have")
    if training:
        p.add_argument("--epochs", type=argtypes.non_negative_int, default=5)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--lr", type=float, default=0.01)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation (digits, text)")
        p.add_argument("--retrain-scope", default=RetrainScope.FULL.value, choices=[s.value for s in RetrainScope],
                       help="which parameters train: all, the last stages (last), and every normalisation layer (last_bn),"
                            " or biases, normalisation layers and the classifier (bias)")
        p.add_argument("--last-share", type=argtypes.last_share, default=DEFAULT_LAST_SHARE,
                       help="share of the weight layers, at the end, that the last and last_bn scopes train")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    if data or training:
        p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")


def _init_arguments(p: argparse.ArgumentParser) -> None:
    from .architectures import ARCHS
    from .data import Interpolation

    p.add_argument("dir")
    p.add_argument("--arch", required=True,
                   help=f"one of: {', '.join(sorted(ARCHS))}; or timm:<model> (any timm model, e.g. timm:efficientnet_b0); "
                        "or package.module:factory, a function returning your nn.Module, called as factory(num_classes=N, **arch-kwargs)")
    p.add_argument("--arch-kwargs", type=argtypes.json_object, default={}, metavar="JSON",
                   help="keyword arguments of the timm model or factory, as a JSON object (kept in model.json)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--class-names", help="comma-separated class names (default 0..N-1)")
    p.add_argument("--classes-from", help="take class names from the sub-folders of this ImageFolder")
    p.add_argument("--weights", help="initial weights: .safetensors, or a torch state dict or training checkpoint (read with "
                                      "weights_only); a classifier named differently or with another class count is mapped or left untrained")
    p.add_argument("--image-size", type=argtypes.positive_int, help="the model's square input (the crop size), e.g. 224")
    p.add_argument("--resize-size", type=argtypes.positive_int,
                   help="scale each image's shorter side to this, then cut the centre --image-size square (torchvision's "
                        "presets: 256 for 224); default: scale the whole image to the square")
    p.add_argument("--interpolation", default=Interpolation.BILINEAR.value, choices=[i.value for i in Interpolation],
                   help="resampling filter of the resize")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, training=True)


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    from .criteria import CRITERIA

    _add_common(p, training=True)
    p.add_argument("--level", type=argtypes.level, required=True, help="fraction of parameters to remove (between 0 and 1), or 'auto'")
    p.add_argument("--criterion", default="l1", type=argtypes.criteria,
                   help=f"how channels are ranked: one of {', '.join(sorted(CRITERIA))}, or several comma-separated "
                        "(each is tried, the model best on the held-out split is kept; costs one retraining each)")
    p.add_argument("--allocation", default="uniform", type=argtypes.allocations,
                   help="how the level is spread over the layers: uniform (the same share of channels each), global (by "
                        "score per parameter), or uniform,global (both tried, the better on the held-out split kept)")
    p.add_argument("--finetune-before", type=argtypes.non_negative_int, default=0, metavar="N", help="fine-tune the unpruned model N epochs first (ADaPT)")
    p.add_argument("--fade", type=argtypes.non_negative_int, default=0, metavar="N",
                   help="fade the channels to remove out over N epochs of training before removing them (then --epochs of retraining)")
    p.add_argument("--tolerance", type=float, default=0.02, help="accuracy drop allowed by --level auto")
    p.add_argument("--round-to", type=int, default=8, help="keep channel counts a multiple of this")
    p.add_argument("--out", required=True, help="directory for the pruned model")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p)


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17)


COMMANDS: tuple[tuple[str, str, Configure, Callable], ...] = (
    ("init", "make a model directory", _init_arguments, cmd_init),
    ("train", "train or fine-tune on an ImageFolder", _train_arguments, cmd_train),
    ("prune", "one offline rank → prune → retrain → evaluate cycle", _prune_arguments, cmd_prune),
    ("eval", "top-1 accuracy on an ImageFolder", _eval_arguments, cmd_eval),
    ("calibrate", "fit the temperature and class prior on labelled images (for serving under label shift)", _eval_arguments, cmd_calibrate),
    ("info", "describe a model directory", _info_arguments, cmd_info),
    ("export", "export a model directory", _export_arguments, cmd_export),
)


def add_command(sub, name: str, help_text: str, configure: Configure, func: Callable | None = None) -> OneLineParser:
    """Register a subcommand on `build_parser`'s subparsers; `configure(parser)` adds its arguments
    (and may set `func` itself) only when it is parsed, so it may import heavy modules freely."""
    parser: OneLineParser = sub.add_parser(name, help=help_text, configure=configure)
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def build_parser(add_commands: Callable[[Any], None] | None = None) -> OneLineParser:
    """The `edgetune` parser with prune_core's commands; `add_commands(subparsers)` registers more
    (the daemon's `serve`, `status`, `watch`, `demo`) with `add_command`."""
    parser = OneLineParser(prog="edgetune", description="On-device data-aware pruning and retraining of CNNs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, help_text, configure, func in COMMANDS:
        add_command(sub, name, help_text, configure, func)
    if add_commands is not None:
        add_commands(sub)
    return parser


def run(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse, dispatch, print; one-line errors instead of tracebacks for anything the user can fix
    (UsageError, and prune_core's DataError and ModelFormatError, are ValueErrors)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    func: Callable = args.func
    try:
        result = func(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"edgetune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgetune {args.command}: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        _emit(result)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))
