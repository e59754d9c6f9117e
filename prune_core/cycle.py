"""One offline prune-retrain cycle: (fine-tune) → rank → prune → retrain → evaluate.

This is the unit both the CLI (`edgetune prune`) and the daemon run. With `finetune_before`
it is the seed paper's ADaPT recipe (adapt the unpruned model to the local data, then rank and
prune it); with `fade_epochs` the channels chosen for removal are faded out while the whole
network trains before they are removed (`fade`); with `level="auto"` the level is chosen by
`search_level`. Which parameters every training run of the cycle updates is `train.scope`
(prune_core.scope: all, or the last stages and/or the cheap ones).

With `prune_steps` > 1 the level is reached gradually: the model is re-ranked, pruned a step further
and distilled again at each step, from the previous step's student. `level="auto"` then walks such
steps towards `max_level` and keeps the last student found good enough on the choosing samples:
without labels by the label-free judge (`run_cycle(close_enough=)`, the daemon's acceptance rule),
with labels within `tolerance` of the fine-tuned unpruned model (as `search_level` does). A time budget (`train.budget_s`) is shared equally between the steps; with
`checkpoints` every training run of the cycle is resumable (retrain.train's checkpoint).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Callable, Literal

from torch import nn

from .cost_records import Phase, PhaseClock
from .criteria import get_criterion, parse_criteria
from .data import ImageSet, batches
from .fade import ChannelFade
from .level_search import Probe, search_level
from .measure import Comparison, agreement, compare, count_macs, count_params, evaluate, peak_rss_mb
from .options import DEFAULT_MAX_AUTO_LEVEL
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
    prune_steps: int = 1  # reach the level in this many prune-and-distil steps (gradual pruning)
    max_level: float = DEFAULT_MAX_AUTO_LEVEL  # the last step's level of a label-free level="auto" walk
    train: TrainConfig = field(default_factory=TrainConfig)  # retraining (n_r = train.epochs)


@dataclass
class CycleResult:
    model: nn.Module
    card: ModelCard
    summary: dict


def adaptation(config: TrainConfig, epochs: int) -> TrainConfig:
    """Settings for fine-tuning the unpruned model to the local data: cross-entropy on labelled
    samples, distillation from the deployed model on unlabelled ones only. Distilling labelled
    samples from it too would anchor the model to the very mistakes adapting is meant to fix.
    Its length is `epochs`, never the retraining's time budget."""
    return replace(config, epochs=epochs, distill_weight=0.0, budget_s=None)


def gradual_levels(level: float, steps: int) -> list[float]:
    """The levels (shares of the unpruned model's parameters removed) after each of `steps` equal steps."""
    return [level * (i + 1) / steps for i in range(steps)]


# Whether a label-free candidate is close enough to the teacher: (its comparison with the teacher on the
# choosing samples, parameters before, parameters after) → bool. The daemon passes its acceptance rule.
CloseEnough = Callable[[Comparison, int, int], bool]


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
    close_enough: CloseEnough | None = None,
    checkpoints: str | Path | None = None,
) -> CycleResult:
    """Produce a pruned, retrained model and a JSON-able summary; `model` is not modified.

    `held_set` makes the cycle's choices (early stopping, the level search, the criterion); the
    summary's verdict (top1_before/after, agreement_with_before, per class) is measured on
    `judge_set` where given (data.split_judging), else on `held_set` too, where it is optimistic.
    `parent` names the source model in the new card's lineage (a path or a daemon version); `clock`
    times the cycle's phases (prune_core.cost.Phase), for the cost predicted beside the actual.
    `close_enough` judges the steps of a label-free level="auto" walk (module docstring; without it,
    agreement within `tolerance` of the unpruned model's, as the level search does); `checkpoints` is a
    directory where every training run keeps a resumable checkpoint.
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
    saving = Path(checkpoints) if checkpoints is not None else None
    slot = lambda name: saving / f"{name}.pt" if saving is not None else None  # noqa: E731
    if config.finetune_before > 0:
        reference = copy.deepcopy(base)
        ft = adaptation(config.train, config.finetune_before)
        with timing(Phase.FINETUNE):
            train(reference, train_set, held_set, mean, std, ft, teacher=base, should_continue=guard, progress=progress,
                  checkpoint=slot("finetune"))

    allocations = parse_allocations(config.allocation)

    def rank(source: nn.Module) -> list:
        """(name, criterion, scores) of each criterion on `source`."""
        ranked = []
        for name in parse_criteria(config.criterion):
            criterion = get_criterion(name, seed=config.train.seed, max_batches=config.calibration_batches)
            calibration = batches(train_set, config.train.batch_size, mean, std, shuffle=True, seed=config.train.seed, device=device)
            with timing(Phase.RANKING):
                ranked.append((name, criterion, criterion.score(source, calibration if criterion.data_aware else None)))
        return ranked

    rankings = rank(reference)

    def prune_and_retrain(level: float, source: nn.Module | None = None, ranked: list | None = None, stage: str = "",
                          train_config: TrainConfig | None = None) -> tuple[Probe, nn.Module]:
        """Prune `source` (the reference) by `level` of its parameters and retrain it with each criterion and
        allocation; the model best on the held-out split wins (ties: the first named). The probe's seconds
        are those of every try."""
        t0 = time.monotonic()
        best: tuple[Probe, nn.Module] | None = None
        tried: dict[str, float] = {}
        for name, criterion, scores in (ranked or rankings):
            for allocation in allocations:
                probe, pruned = prune_and_retrain_one(level, name, criterion, scores, allocation, source or reference,
                                                      f"{stage}{name}-{allocation}-{level:.4f}", train_config or config.train)
                tried[f"{name}/{allocation}"] = probe.accuracy
                if best is None or probe.accuracy > best[0].accuracy:
                    best = probe, pruned
        best[0].tried, best[0].seconds = tried, time.monotonic() - t0
        return best

    def prune_and_retrain_one(level: float, name: str, criterion, scores, allocation: str, source: nn.Module, key: str,
                              train_config: TrainConfig) -> tuple[Probe, nn.Module]:
        t0 = time.monotonic()
        spec = PruneSpec(level, allocation, config.round_to, config.protect_stem, config.protect_classifier, config.max_layer_ratio)
        with timing(Phase.PRUNE):
            outcome = prune_to_level(source, scores, spec, card.input_size, criterion.prefer_norm_layers)
        pruned = outcome.model
        if config.fade_epochs > 0 and not state["stopped"]:
            with timing(Phase.FADE):
                fading = copy.deepcopy(source)
                fade = ChannelFade(fading, removed_channels(source, outcome.history, card.input_size))
                # no held-out selection here: an earlier epoch is a half-faded network, not a better one
                fade_cfg = replace(train_config, epochs=config.fade_epochs, budget_s=None)
                train(fading, train_set, None, mean, std, fade_cfg, teacher=reference, should_continue=guard, progress=progress,
                      on_step=fade.schedule, checkpoint=slot(f"fade-{key}"))
                fade.apply(0.0)
            with timing(Phase.PRUNE):
                pruned = replay(fading, outcome.history, card.input_size)
        retrained = TrainResult()
        if not state["stopped"]:
            with timing(Phase.RETRAIN):
                retrained = train(pruned, train_set, held_set, mean, std, train_config, teacher=reference, should_continue=guard,
                                  progress=progress, checkpoint=slot(f"retrain-{key}"))
        with timing(Phase.VALIDATION):
            accuracy = score(pruned)
        with timing(Phase.PRUNE):
            macs = count_macs(pruned, card.input_size)
        achieved = 1 - outcome.params_after / params_reference
        probe = Probe(
            level, achieved, accuracy, outcome.params_after, macs,
            time.monotonic() - t0, criterion=name, allocation=outcome.allocation, retrain_epochs=len(retrained.history),
            kept_epoch=retrained.best_epoch, early_stop_epoch=retrained.early_stop_epoch, retrain_front=retrained.front,
            clipped_steps=retrained.clipped_steps, retrain_steps=retrained.steps, resumed_epoch=retrained.resumed_epoch,
        )
        return probe, pruned

    params_reference = count_params(reference)

    def ceiling_of() -> tuple[nn.Module, float]:
        """The unpruned model fine-tuned with the same budget, and its score: what the level search keeps within tolerance of."""
        ceiling_model = reference
        if config.finetune_before == 0:
            ceiling_model = copy.deepcopy(base)
            ft = adaptation(config.train, config.train.epochs)
            with timing(Phase.FINETUNE):
                train(ceiling_model, train_set, held_set, mean, std, ft, teacher=base, should_continue=guard, progress=progress,
                      checkpoint=slot("ceiling"))
        with timing(Phase.VALIDATION):
            return ceiling_model, score(ceiling_model)

    def gradually(levels: list[float], judge: Callable[[Probe, nn.Module], bool] | None) -> tuple[list[Probe], Probe | None, nn.Module | None]:
        """Prune step by step through `levels` (of the reference's parameters), each step re-ranked and distilled
        from the previous student with an equal share of the time budget; with `judge`, stop at the first step
        it rejects. (probes, the last step kept, its model)."""
        share = replace(config.train, budget_s=config.train.budget_s / len(levels)) if config.train.budget_s else config.train
        source, kept, model_kept, walked = reference, None, None, []
        for k, target in enumerate(levels):
            if state["stopped"]:
                break
            relative = 1 - (1 - target) / (count_params(source) / params_reference)
            ranked = rankings if source is reference else rank(source)
            probe, student = prune_and_retrain(max(0.0, min(relative, 0.99)), source, ranked, f"step{k + 1}-", share)
            probe.level = target
            probe.feasible = judge(probe, student) if judge is not None else True
            walked.append(probe)
            if on_probe is not None:
                on_probe(probe)
            if not probe.feasible:
                break
            kept, model_kept, source = probe, student, student
        return walked, kept, model_kept

    probes: list[Probe] = []
    ceiling = None
    label_free = evidence is Evidence.AGREEMENT and close_enough is not None
    if config.level == "auto" and (label_free or config.prune_steps > 1):
        if not label_free:  # labels (or no judge): within tolerance of the fine-tuned unpruned model, as search_level
            _, ceiling = ceiling_of()
            judge = lambda probe, _m: probe.accuracy >= ceiling - config.tolerance  # noqa: E731
        else:
            def judge(probe: Probe, student: nn.Module) -> bool:
                with timing(Phase.VALIDATION):
                    return close_enough(compare(student, base, held()), params_reference, count_params(student))
        probes, kept, found_model = gradually(gradual_levels(config.max_level, max(1, config.prune_steps)), judge)
        level = kept.level if kept is not None else 0.0
        pruned = found_model if found_model is not None else reference
    elif config.level == "auto":
        ceiling_model, ceiling = ceiling_of()
        found = search_level(prune_and_retrain, ceiling, config.tolerance, on_probe=on_probe)
        probes, level, kept = found.probes, found.level, found.best_probe
        pruned = found.best if found.best is not None else ceiling_model
    elif config.prune_steps > 1:
        level = float(config.level)
        probes, kept, pruned = gradually(gradual_levels(level, config.prune_steps), None)
        pruned = pruned if pruned is not None else reference
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
        "prune_steps": config.prune_steps,
        "retrain_budget_s": config.train.budget_s,
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
