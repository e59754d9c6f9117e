"""One offline prune-retrain cycle: (fine-tune) → rank → prune → retrain → evaluate.

This is the unit both the CLI (`edgetune prune`) and the daemon run. With `finetune_before`
it is the seed paper's ADaPT recipe (adapt the unpruned model to the local data, then rank and
prune it); with `fade_epochs` the channels chosen for removal are faded out while the whole
network trains before they are removed (`fade`); with `level="auto"` the level is chosen by
`search_level`. Which parameters every training run of the cycle updates is `train.scope`
(prune_core.scope: all, or the last stages and/or the cheap ones).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable, Literal

from torch import nn

from .cost_records import Phase, PhaseClock
from .criteria import get_criterion, parse_criteria
from .data import ImageSet, batches
from .fade import ChannelFade
from .level_search import Probe, search_level
from .measure import agreement, compare, count_macs, count_params, evaluate, peak_rss_mb
from .model_format import Lineage, ModelCard
from .retrain import TrainConfig, TrainProgress, TrainResult, train
from .scope import plan_scope
from .surgery import PruneSpec, parse_allocations, prune_to_level, removed_channels, replay


class Evidence(str, Enum):
    """What judged the candidates: held-out labels, or (none there) agreement with the teacher."""

    LABELS = "labels"
    AGREEMENT = "agreement"


@dataclass
class CycleConfig:
    level: float | Literal["auto"] = 0.5
    criterion: str = "l1"  # or several, comma-separated: each is tried and the best on the held-out split kept
    allocation: str = "uniform"  # "global", or "uniform,global": both are tried and the best on the held-out split kept
    finetune_before: int = 0  # n_f epochs of adapting the unpruned model first (ADaPT)
    fade_epochs: int = 0  # epochs of fading out the doomed channels in the unpruned model before removing them
    tolerance: float = 0.02  # for level="auto"
    round_to: int = 8
    max_layer_ratio: float = PruneSpec.max_layer_ratio  # no layer loses more than this share of its channels
    protect_stem: bool = True
    protect_classifier: bool = True
    calibration_batches: int = 32  # batches the data-aware criteria see
    train: TrainConfig = field(default_factory=TrainConfig)  # retraining (n_r = train.epochs)


@dataclass
class CycleResult:
    model: nn.Module
    card: ModelCard
    summary: dict


def adaptation(config: TrainConfig, epochs: int) -> TrainConfig:
    """Settings for fine-tuning the unpruned model to the local data: cross-entropy on labelled
    samples, distillation from the deployed model on unlabelled ones only. Distilling labelled
    samples from it too would anchor the model to the very mistakes adapting is meant to fix."""
    return replace(config, epochs=epochs, distill_weight=0.0)


def _progress_guard(should_continue: Callable[[TrainProgress], bool] | None):
    state = {"stopped": False}

    def guard(p: TrainProgress) -> bool:
        ok = should_continue(p) if should_continue is not None else True
        state["stopped"] |= not ok
        return ok

    return guard, state


def run_cycle(
    model: nn.Module,
    card: ModelCard,
    train_set: ImageSet,
    held_set: ImageSet,
    config: CycleConfig,
    should_continue: Callable[[TrainProgress], bool] | None = None,
    on_probe: Callable[[Probe], None] | None = None,
    progress: bool = False,
    parent: str | None = None,
    clock: PhaseClock | None = None,
    judge_set: ImageSet | None = None,
) -> CycleResult:
    """Produce a pruned, retrained model and a JSON-able summary; `model` is not modified.

    `held_set` makes the cycle's choices (early stopping, the level search, the criterion); the
    summary's verdict (top1_before/after, agreement_with_before, per class) is measured on
    `judge_set` where given (data.split_judging), else on `held_set` too, where it is optimistic.
    `parent` names the source model in the new card's lineage (a path or a daemon version); `clock`
    times the cycle's phases (prune_core.cost.Phase), for the cost predicted beside the actual.
    """
    timing = (clock or PhaseClock()).timing
    started = time.monotonic()
    device = next(model.parameters()).device
    mean, std = card.mean, card.std
    guard, state = _progress_guard(should_continue)
    # evaluated at the training batch size, so judging never needs more memory than retraining
    held = lambda: batches(held_set, config.train.batch_size, mean, std, device=device)  # noqa: E731
    judged_on = held_set if judge_set is None else judge_set
    judging = lambda: batches(judged_on, config.train.batch_size, mean, std, device=device)  # noqa: E731
    base = copy.deepcopy(model).eval()
    with timing(Phase.VALIDATION):
        acc_before = evaluate(base, judging())
    evidence = Evidence.LABELS if held_set.labelled > 0 else Evidence.AGREEMENT  # what the choices go by
    verdict = Evidence.LABELS if judged_on.labelled > 0 else Evidence.AGREEMENT  # what the summary's verdict rests on

    def score(candidate: nn.Module) -> float:
        """What the level search and the choice between criteria judge by: held-out top-1 where
        the split has labels, else agreement with `model` (the teacher) on it."""
        return evaluate(candidate, held()).top1 if evidence is Evidence.LABELS else agreement(candidate, base, held())

    reference = base
    if config.finetune_before > 0:
        reference = copy.deepcopy(base)
        ft = adaptation(config.train, config.finetune_before)
        with timing(Phase.FINETUNE):
            train(reference, train_set, held_set, mean, std, ft, teacher=base, should_continue=guard, progress=progress)

    allocations = parse_allocations(config.allocation)
    rankings = []
    for name in parse_criteria(config.criterion):
        criterion = get_criterion(name, seed=config.train.seed, max_batches=config.calibration_batches)
        calibration = batches(train_set, config.train.batch_size, mean, std, shuffle=True, seed=config.train.seed, device=device)
        with timing(Phase.RANKING):
            rankings.append((name, criterion, criterion.score(reference, calibration if criterion.data_aware else None)))

    def prune_and_retrain(level: float) -> tuple[Probe, nn.Module]:
        """Prune and retrain with each criterion and allocation at `level`; the model best on the held-out split
        wins (ties: the first named). The probe's seconds are those of every try."""
        t0 = time.monotonic()
        best: tuple[Probe, nn.Module] | None = None
        tried: dict[str, float] = {}
        for name, criterion, scores in rankings:
            for allocation in allocations:
                probe, pruned = prune_and_retrain_one(level, name, criterion, scores, allocation)
                tried[f"{name}/{allocation}"] = probe.accuracy
                if best is None or probe.accuracy > best[0].accuracy:
                    best = probe, pruned
        best[0].tried, best[0].seconds = tried, time.monotonic() - t0
        return best

    def prune_and_retrain_one(level: float, name: str, criterion, scores, allocation: str) -> tuple[Probe, nn.Module]:
        t0 = time.monotonic()
        spec = PruneSpec(level, allocation, config.round_to, config.protect_stem, config.protect_classifier, config.max_layer_ratio)
        with timing(Phase.PRUNE):
            outcome = prune_to_level(reference, scores, spec, card.input_size, criterion.prefer_norm_layers)
        pruned = outcome.model
        if config.fade_epochs > 0 and not state["stopped"]:
            with timing(Phase.FADE):
                fading = copy.deepcopy(reference)
                fade = ChannelFade(fading, removed_channels(reference, outcome.history, card.input_size))
                # no held-out selection here: an earlier epoch is a half-faded network, not a better one
                fade_cfg = replace(config.train, epochs=config.fade_epochs)
                train(fading, train_set, None, mean, std, fade_cfg, teacher=reference, should_continue=guard, progress=progress,
                      on_step=fade.schedule)
                fade.apply(0.0)
            with timing(Phase.PRUNE):
                pruned = replay(fading, outcome.history, card.input_size)
        retrained = TrainResult()
        if not state["stopped"]:
            with timing(Phase.RETRAIN):
                retrained = train(pruned, train_set, held_set, mean, std, config.train, teacher=reference, should_continue=guard,
                                  progress=progress)
        with timing(Phase.VALIDATION):
            accuracy = score(pruned)
        with timing(Phase.PRUNE):
            macs = count_macs(pruned, card.input_size)
        probe = Probe(
            level, outcome.achieved_level, accuracy, outcome.params_after, macs,
            time.monotonic() - t0, criterion=name, allocation=outcome.allocation, retrain_epochs=len(retrained.history),
            kept_epoch=retrained.best_epoch, early_stop_epoch=retrained.early_stop_epoch, retrain_front=retrained.front,
            clipped_steps=retrained.clipped_steps,
        )
        return probe, pruned

    probes: list[Probe] = []
    ceiling = None
    if config.level == "auto":
        ceiling_model = reference
        if config.finetune_before == 0:  # the ceiling: the unpruned model fine-tuned with the same budget
            ceiling_model = copy.deepcopy(base)
            ft = adaptation(config.train, config.train.epochs)
            with timing(Phase.FINETUNE):
                train(ceiling_model, train_set, held_set, mean, std, ft, teacher=base, should_continue=guard, progress=progress)
        with timing(Phase.VALIDATION):
            ceiling = score(ceiling_model)
        found = search_level(prune_and_retrain, ceiling, config.tolerance, on_probe=on_probe)
        probes, level, kept = found.probes, found.level, found.best_probe
        pruned = found.best if found.best is not None else ceiling_model
    else:
        level = float(config.level)
        kept, pruned = prune_and_retrain(level)
        probes = [kept]
        if on_probe is not None:
            on_probe(kept)
    used, allocation_used = (kept.criterion, kept.allocation) if kept is not None else (None, None)

    with timing(Phase.VALIDATION):
        acc_after = evaluate(pruned, judging())
        against = compare(pruned, base, judging())
    with timing(Phase.PRUNE):
        macs_before, macs_after = count_macs(base, card.input_size), count_macs(pruned, card.input_size)
    params_before, params_after = count_params(base), count_params(pruned)
    summary = {
        "criterion": config.criterion,
        "criterion_used": used,  # the one whose model this is (None: no level kept accuracy, the unpruned model)
        "allocation": config.allocation,
        "allocation_used": allocation_used,  # uniform falls back to global where it cannot reach the level
        "finetune_before": config.finetune_before,
        "retrain_scope": config.train.scope.value,
        "retrain_plan": plan_scope(pruned, config.train.scope, config.train.last_share).to_dict(),
        "fade_epochs": config.fade_epochs,
        "level_requested": config.level,
        "level": level,
        "level_achieved": 1 - params_after / params_before,
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "top1_before": acc_before.top1,
        "top1_after": acc_after.top1,
        "top1_ceiling": ceiling,  # on the choosing samples' evidence: top-1, or agreement with the teacher
        "chosen_by": evidence.value,
        "evidence": verdict.value,  # top1_before/after and agreement_with_before are on the judging samples
        "agreement_with_before": against.agreement,
        # the top-1 lost against the model before, as its probabilities see it (measure.Comparison): an
        # estimate without labels where that model is calibrated (a prior-corrected teacher)
        "expected_loss": against.expected_loss,
        "expected_loss_se": against.expected_loss_se,
        "train_samples": len(train_set),
        "choosing_samples": len(held_set),  # early stopping, the level search, the choice between criteria
        "held_out_samples": len(judged_on),  # the judging samples: the choosing ones unless `judge_set` was given
        "held_out_labelled": judged_on.labelled,
        "held_out_per_class": acc_after.to_dict(card.class_names)["per_class"],
        "probes": [p.to_dict() for p in probes],
        "stopped": state["stopped"],
        "seconds": time.monotonic() - started,
        "peak_rss_mb": peak_rss_mb(),
    }
    new_card = copy.deepcopy(card)
    new_card.lineage = Lineage(
        parent=parent,
        criterion=used or config.criterion,
        level=level,
        allocation=allocation_used or config.allocation,
        finetune_before=config.finetune_before,
        retrain_scope=config.train.scope.value,
        metrics={k: summary[k] for k in ("top1_before", "top1_after", "params_before", "params_after", "macs_before", "macs_after")},
    )
    return CycleResult(pruned.eval(), new_card, summary)
