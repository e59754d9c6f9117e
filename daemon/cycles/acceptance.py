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

Where the cycle measured paired evidence on its judging samples (prune_core.evidence.JudgingEvidence),
closeness is shown instead at level `confidence`, whose error alpha is split in three (a false accept
needs one of the three bounds to fail): the exact Clopper-Pearson bound on the disagreement rate, which
bounds the loss outright; the calibrated, corrected teacher's expected loss over all judging samples,
trusted only while the labels there are do not refute its calibration; and, failing both, the labels of
at most `max_asked` disagreements, bounded by a confidence sequence that stays valid however often it
is re-checked. Until those labels decide, the candidate is `pending`; it is rejected once the labels
show it worse than `max_drop` or every asked disagreement is labelled without an accept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator, Mapping

from prune_core.evidence import JudgingEvidence, clopper_pearson_upper, normal_upper, paired_bound
from prune_core.jsonsafe import is_finite_number

Z_95 = 1.645  # one-sided 95 % normal quantile: the margin on an expected loss, in standard errors


@dataclass(frozen=True)
class Acceptance:
    max_drop: float  # held-out top-1 a candidate may lose against the served model (labels)
    min_gain: float  # fraction of parameters a candidate must remove
    min_agreement: float  # share of held-out samples it must answer like the (corrected) teacher
    min_label_evidence: int = 0  # below this many (and under half) labelled held-out samples, a corrected teacher's agreement is required too
    confidence: float = 0.95  # of the paired-evidence bounds, all three together
    max_asked: int = 100  # disagreements a pending candidate asks labels for; 0: never pending

    @classmethod
    def of(cls, source: Any) -> "Acceptance":
        """From Settings or a CycleJob (the same field names)."""
        return cls(source.max_accuracy_drop, source.min_size_gain, source.min_agreement, source.min_label_evidence,
                   source.acceptance_confidence, source.disagreement_labels)


class Verdict(str, Enum):
    ACCEPTED = "accepted"
    PENDING = "pending"  # the evidence so far neither accepts nor rejects: labels of disagreements are asked for
    REJECTED = "rejected"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPTED

    @property
    def pending(self) -> bool:
        return self.verdict is Verdict.PENDING

    def __iter__(self) -> Iterator:
        """Unpacks (and indexes) as (accepted, reason), for callers that need no more."""
        return iter((self.accepted, self.reason))

    def __getitem__(self, index: int) -> Any:
        return tuple(self)[index]


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


def _paired(evidence: JudgingEvidence, labels: Mapping[str, int], rule: Acceptance, corrected: bool,
            teacher: str) -> tuple[Verdict, str]:
    """Closeness to the teacher on paired evidence (the module's docstring), and how it was shown."""
    alpha = (1 - rule.confidence) / 3
    n, k = evidence.samples, evidence.disagreements
    rate = clopper_pearson_upper(k, n, alpha)
    seen = f"{k} disagreements in {n} judging samples (bound {rate:.4f})"
    if rate <= rule.max_drop:
        return Verdict.ACCEPTED, f"against {teacher}: {seen} at most max_accuracy_drop {rule.max_drop:g}"
    calibration = evidence.calibration
    expected = normal_upper(evidence.expected_loss, evidence.expected_loss_se, alpha)
    if not corrected:
        trusted = "its probabilities are not calibrated (not prior-corrected)"
    elif calibration.refuted(alpha):
        trusted = (f"its calibration is refuted by {calibration.labelled} labels ({calibration.correct} right where "
                   f"it expected {calibration.expected:.1f})")
    elif not is_finite_number(expected):
        trusted = "no expected loss"
    elif expected <= rule.max_drop:
        return Verdict.ACCEPTED, (f"against {teacher}: expected top-1 loss {evidence.expected_loss:.4f} on {n} judging "
                                  f"samples (bound {expected:.4f}; {seen})")
    else:
        trusted = f"expected top-1 loss {evidence.expected_loss:.4f} (bound {expected:.4f}) above max_accuracy_drop {rule.max_drop:g}"
    paired = paired_bound(evidence, labels, alpha, alpha)
    told = (f"{paired.labelled} of {len(evidence.asked)} asked disagreements labelled ({paired.student_only} right by the candidate "
            f"only, {paired.teacher_only} by the teacher only, McNemar p {paired.mcnemar_p:.3f}): top-1 loss within "
            f"[{paired.lower:.4f}, {paired.upper:.4f}]")
    if paired.labelled and paired.upper <= rule.max_drop:
        return Verdict.ACCEPTED, f"against {teacher}: {told}; {seen}"
    if paired.lower > rule.max_drop:
        return Verdict.REJECTED, f"against {teacher}: {told}, worse than max_accuracy_drop {rule.max_drop:g}"
    why = f"against {teacher}: {seen}; {trusted}"
    if not evidence.asked or rule.max_asked <= 0:
        return Verdict.REJECTED, why
    if paired.labelled >= len(evidence.asked):
        return Verdict.REJECTED, f"{why}; {told}, above max_accuracy_drop {rule.max_drop:g} with every asked label in"
    return Verdict.PENDING, f"{why}; {told}: labels of the disagreements wanted"


def decide(summary: dict, rule: Acceptance, evidence: JudgingEvidence | None = None,
           labels: Mapping[str, int] | None = None) -> Decision:
    """Smaller by at least `min_gain` of the parameters, and then, on the evidence the cycle had
    (summary["evidence"]): with labelled held-out samples, not worse than the served model by more
    than `max_drop` on them; without (or with too few of them), close to the (prior-corrected) served
    model, on the paired `evidence` and the `labels` (sample key → class index) of its asked
    disagreements where given (the module's docstring). The reason names the evidence that decided; the
    Decision unpacks as (accepted, reason)."""
    gain = 1 - summary["params_after"] / summary["params_before"]
    if gain < rule.min_gain:
        return Decision(Verdict.REJECTED, f"size gain {gain:.3f} below min_size_gain {rule.min_gain:g}")
    corrected = bool((summary.get("teacher") or {}).get("corrected"))
    teacher = "the prior-corrected served model" if corrected else "the served model"
    if evidence is None:
        return Decision(*_by_summary(summary, rule, corrected, teacher, gain))
    if _has_labels(summary):
        before, after = summary["top1_before"], summary["top1_after"]
        if after < before - rule.max_drop:
            return Decision(Verdict.REJECTED, f"labels: held-out top-1 {after:.4f} is below served {before:.4f} by more than {rule.max_drop:g}")
        if not _sparse(summary, rule):
            return Decision(Verdict.ACCEPTED, f"labels: held-out top-1 {before:.4f} → {after:.4f}, {gain:.1%} fewer parameters")
    verdict, how = _paired(evidence, labels or {}, rule, corrected, teacher)
    if verdict is Verdict.ACCEPTED:
        how += f", {gain:.1%} fewer parameters"
    return Decision(verdict, ("paired evidence: " if verdict is not Verdict.PENDING else "pending: ") + how)


def _sparse(summary: dict, rule: Acceptance) -> bool:
    labelled, held = summary.get("held_out_labelled"), summary.get("held_out_samples")
    return bool(labelled is not None and held and labelled < rule.min_label_evidence and labelled < held / 2)


def _by_summary(summary: dict, rule: Acceptance, corrected: bool, teacher: str, gain: float) -> tuple[Verdict, str]:
    """The rule on a summary alone (no paired evidence: an older record, a stand-in worker)."""
    if _has_labels(summary):
        before, after = summary["top1_before"], summary["top1_after"]
        if after < before - rule.max_drop:
            return Verdict.REJECTED, f"labels: held-out top-1 {after:.4f} is below served {before:.4f} by more than {rule.max_drop:g}"
        labelled, held = summary.get("held_out_labelled"), summary.get("held_out_samples")
        if corrected and _sparse(summary, rule):
            close, how = _close_to_teacher(summary, rule, corrected)
            if not close:
                return Verdict.REJECTED, (f"labels and agreement: {labelled} of {held} held-out samples labelled (fewer than "
                                          f"min_label_evidence {rule.min_label_evidence}), and against {teacher}: {how}")
        return Verdict.ACCEPTED, f"labels: held-out top-1 {before:.4f} → {after:.4f}, {gain:.1%} fewer parameters"
    close, how = _close_to_teacher(summary, rule, corrected)
    if not close:
        return Verdict.REJECTED, f"no labels: against {teacher}: {how}"
    return Verdict.ACCEPTED, f"no labels: {how} with {teacher}, {gain:.1%} fewer parameters"
