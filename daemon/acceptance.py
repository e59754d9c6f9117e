"""The acceptance rule: whether a cycle's candidate replaces the served model, and on what evidence.

One rule for the worker, the fake worker in tests and the benchmarks. Labels decide where there are
enough of them to tell a point of top-1 apart. Where labels are sparse (fewer than `min_label_evidence`
labelled held-out samples, and under half of them) and the teacher is prior-corrected, the student
learnt mostly from that teacher, and it must also stay close to it: a handful of labels cannot show
that departing from the best unlabelled estimate is an improvement.

Close to the teacher means either answering like it on `min_agreement` of the held-out samples (a
student can lose at most the samples they disagree on), or, where the teacher is prior-corrected and
so calibrated, losing at most `max_drop` of top-1 as the teacher's own probabilities expect, with a
one-sided 95 % margin for the samples' spread (summary["expected_loss"], measure.Comparison).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prune_core.jsonsafe import is_finite_number

Z_95 = 1.645  # one-sided 95 % normal quantile: the margin on an expected loss, in standard errors


@dataclass(frozen=True)
class Acceptance:
    max_drop: float  # held-out top-1 a candidate may lose against the served model (labels)
    min_gain: float  # fraction of parameters a candidate must remove
    min_agreement: float  # share of held-out samples it must answer like the (corrected) teacher
    min_label_evidence: int = 0  # below this many (and under half) labelled held-out samples, a corrected teacher's agreement is required too

    @classmethod
    def of(cls, source: Any) -> "Acceptance":
        """From Settings or a CycleJob (the same field names)."""
        return cls(source.max_accuracy_drop, source.min_size_gain, source.min_agreement, source.min_label_evidence)


def _has_labels(summary: dict) -> bool:
    before = summary["top1_before"]
    return summary.get("evidence", "labels") == "labels" and not (isinstance(before, float) and math.isnan(before))


def _close_to_teacher(summary: dict, rule: Acceptance, corrected: bool) -> tuple[bool, str]:
    """Whether the candidate stays close to the teacher (see the module's docstring), and how it was shown."""
    agreement = summary["agreement_with_before"]
    if agreement >= rule.min_agreement:
        return True, f"agreement {agreement:.4f}"
    loss, se = summary.get("expected_loss"), summary.get("expected_loss_se")
    if not (corrected and is_finite_number(loss) and is_finite_number(se)):
        return False, f"agreement {agreement:.4f} below min_agreement {rule.min_agreement:g}"
    bound = loss + Z_95 * se
    if bound <= rule.max_drop:
        return True, f"expected top-1 loss {loss:.4f} (95 % bound {bound:.4f}; agreement {agreement:.4f})"
    return False, (f"agreement {agreement:.4f} below min_agreement {rule.min_agreement:g} and expected top-1 loss "
                   f"{loss:.4f} (95 % bound {bound:.4f}) above max_accuracy_drop {rule.max_drop:g}")


def decide(summary: dict, rule: Acceptance) -> tuple[bool, str]:
    """Smaller by at least `min_gain` of the parameters, and then, on the evidence the cycle had
    (summary["evidence"]): with labelled held-out samples, not worse than the served model by more
    than `max_drop` on them; without, close to the (prior-corrected) served model (the module's
    docstring). The reason names the evidence that decided."""
    gain = 1 - summary["params_after"] / summary["params_before"]
    if gain < rule.min_gain:
        return False, f"size gain {gain:.3f} below min_size_gain {rule.min_gain:g}"
    corrected = bool((summary.get("teacher") or {}).get("corrected"))
    teacher = "the prior-corrected served model" if corrected else "the served model"
    if _has_labels(summary):
        before, after = summary["top1_before"], summary["top1_after"]
        if after < before - rule.max_drop:
            return False, f"labels: held-out top-1 {after:.4f} is below served {before:.4f} by more than {rule.max_drop:g}"
        labelled, held = summary.get("held_out_labelled"), summary.get("held_out_samples")
        sparse = labelled is not None and held and labelled < rule.min_label_evidence and labelled < held / 2
        if corrected and sparse:
            close, how = _close_to_teacher(summary, rule, corrected)
            if not close:
                return False, (f"labels and agreement: {labelled} of {held} held-out samples labelled (fewer than min_label_evidence "
                               f"{rule.min_label_evidence}), and against {teacher}: {how}")
        return True, f"labels: held-out top-1 {before:.4f} → {after:.4f}, {gain:.1%} fewer parameters"
    close, how = _close_to_teacher(summary, rule, corrected)
    if not close:
        return False, f"no labels: against {teacher}: {how}"
    return True, f"no labels: {how} with {teacher}, {gain:.1%} fewer parameters"
