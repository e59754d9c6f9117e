"""daemon.cycles.acceptance.decide: the acceptance rule, on the evidence the cycle had."""
from __future__ import annotations

from daemon.cycles.acceptance import Acceptance, decide

NAN = float("nan")
RULE = Acceptance(max_drop=0.01, min_gain=0.05, min_agreement=0.99, min_label_evidence=200)


def _summary(**kw) -> dict:
    return {"params_before": 1000, "params_after": 200, "top1_before": 0.80, "top1_after": 0.80,
            "agreement_with_before": 1.0, "evidence": "labels", **kw}


def test_size_gain_comes_first():
    ok, why = decide(_summary(params_after=990), RULE)
    assert not ok and why.startswith("size gain 0.010")


def test_labels_decide_where_the_held_out_split_has_them():
    assert decide(_summary(top1_after=0.795), RULE)[0]
    ok, why = decide(_summary(top1_after=0.78, agreement_with_before=1.0), RULE)
    assert not ok and why.startswith("labels:")


def test_without_labels_agreement_with_the_corrected_teacher_decides():
    unlabelled = dict(evidence="agreement", top1_before=NAN, top1_after=NAN, teacher={"corrected": True})
    ok, why = decide(_summary(agreement_with_before=0.995, **unlabelled), RULE)
    assert ok and why.startswith("no labels: agreement 0.9950 with the prior-corrected served model")
    ok, why = decide(_summary(agreement_with_before=0.956, **unlabelled), RULE)
    assert not ok and "below min_agreement 0.99" in why
    # a summary from before evidence was recorded: NaN top-1 means no labels
    assert not decide(_summary(agreement_with_before=0.5, top1_before=NAN, top1_after=NAN, evidence="labels"), RULE)[0]


def test_a_few_labels_do_not_overrule_a_corrected_teacher():
    few = dict(held_out_labelled=27, held_out_samples=270, teacher={"corrected": True}, agreement_with_before=0.93)
    ok, why = decide(_summary(top1_after=0.85, **few), RULE)
    assert not ok and why.startswith("labels and agreement: 27 of 270 held-out samples labelled") and "below min_agreement 0.99" in why
    # a small buffer that is mostly labelled learnt from its labels: they decide alone
    assert decide(_summary(top1_after=0.85, **{**few, "held_out_samples": 40}), RULE)[0]
    assert decide(_summary(top1_after=0.85, **{**few, "agreement_with_before": 0.995}), RULE)[0]
    # enough labels: they decide alone
    assert decide(_summary(top1_after=0.85, **{**few, "held_out_labelled": 200}), RULE)[0]
    # an uncorrected teacher is what the labels are there to improve on: they decide alone
    assert decide(_summary(top1_after=0.85, **{**few, "teacher": {"corrected": False}}), RULE)[0]
    # still no worse than the served model on the labels
    assert not decide(_summary(top1_after=0.70, **{**few, "agreement_with_before": 1.0}), RULE)[0]


def test_the_rule_reads_settings_and_jobs_alike():
    from daemon.ops.config import Settings
    s = Settings()
    assert Acceptance.of(s) == Acceptance(s.max_accuracy_drop, s.min_size_gain, s.min_agreement, s.min_label_evidence,
                                          s.acceptance_confidence, s.disagreement_labels)


def test_a_calibrated_teachers_expected_loss_can_show_closeness_without_agreement():
    """Agreement bounds the loss by every disagreement; a prior-corrected teacher's own probabilities
    estimate it, and a candidate whose estimate is within max_drop at 95 % is close enough."""
    unlabelled = dict(evidence="agreement", top1_before=NAN, top1_after=NAN, teacher={"corrected": True}, agreement_with_before=0.95)
    ok, why = decide(_summary(expected_loss=0.004, expected_loss_se=0.002, **unlabelled), RULE)
    assert ok and why.startswith("no labels: expected top-1 loss 0.0040 (95 % bound 0.0073; agreement 0.9500)")
    ok, why = decide(_summary(expected_loss=0.004, expected_loss_se=0.005, **unlabelled), RULE)
    assert not ok and "below min_agreement 0.99" in why and "95 % bound 0.0122) above max_accuracy_drop 0.01" in why
    # an uncorrected teacher's probabilities are not trusted to be calibrated: agreement alone
    ok, why = decide(_summary(expected_loss=0.0, expected_loss_se=0.0, **{**unlabelled, "teacher": {"corrected": False}}), RULE)
    assert not ok and why == "no labels: against the served model: agreement 0.9500 below min_agreement 0.99"
    # a summary without the estimate (an older record) falls back to agreement
    assert not decide(_summary(**unlabelled), RULE)[0]
    # with sparse labels the same closeness applies beside the labels
    few = dict(held_out_labelled=27, held_out_samples=270, teacher={"corrected": True}, agreement_with_before=0.93)
    assert decide(_summary(top1_after=0.85, expected_loss=0.003, expected_loss_se=0.001, **few), RULE)[0]


# ---- paired evidence (prune_core.evidence.JudgingEvidence) ---------------------------------------
from prune_core.evidence import Calibration, Disagreement, JudgingEvidence  # noqa: E402

from daemon.cycles.acceptance import Verdict  # noqa: E402

UNLABELLED = dict(evidence="agreement", top1_before=NAN, top1_after=NAN, teacher={"corrected": True}, agreement_with_before=0.9)


def _evidence(samples=2000, disagreements=200, loss=0.02, se=0.003, calibration=Calibration(), asked=40) -> JudgingEvidence:
    return JudgingEvidence(samples, disagreements, loss, se, calibration, tuple(Disagreement(str(i), 0, 1) for i in range(asked)))


def test_few_disagreements_accept_without_labels():
    d = decide(_summary(**UNLABELLED), RULE, _evidence(samples=3000, disagreements=8, loss=0.5))
    assert d.accepted and "8 disagreements in 3000 judging samples" in d.reason
    # the same rate on too few samples bounds nothing useful
    assert decide(_summary(**UNLABELLED), RULE, _evidence(samples=100, disagreements=0, loss=0.5)).pending


def test_a_calibrated_teachers_expected_loss_on_many_samples_accepts():
    d = decide(_summary(**UNLABELLED), RULE, _evidence(loss=0.002, se=0.002))
    assert d.verdict is Verdict.ACCEPTED and d.reason.startswith("paired evidence: against the prior-corrected served model: expected top-1 loss 0.0020")
    # an uncorrected teacher's probabilities are not trusted
    assert decide(_summary(**{**UNLABELLED, "teacher": {"corrected": False}}), RULE, _evidence(loss=0.002, se=0.002)).pending
    # nor a teacher whose labels refute its calibration
    off = Calibration(200, 120, 170.0, 25.0)
    d = decide(_summary(**UNLABELLED), RULE, _evidence(loss=0.002, se=0.002, calibration=off))
    assert d.pending and "calibration is refuted by 200 labels (120 right where it expected 170.0)" in d.reason
    # labels that agree with it leave it trusted
    assert decide(_summary(**UNLABELLED), RULE, _evidence(loss=0.002, se=0.002, calibration=Calibration(200, 168, 170.0, 25.0))).accepted


def test_pending_then_labels_of_the_disagreements_decide():
    ev = _evidence(disagreements=60, loss=0.03)
    d = decide(_summary(**UNLABELLED), RULE, ev)
    assert d.pending and not d.accepted and d.reason.startswith("pending:") and "0 of 40 asked disagreements labelled" in d.reason
    assert tuple(d) == (False, d.reason) and d[0] is False  # unpacks as (accepted, reason)
    candidate_right = {str(i): 1 for i in range(40)}
    assert decide(_summary(**UNLABELLED), RULE, ev, {k: v for k, v in list(candidate_right.items())[:3]}).pending  # 3 labels: not yet
    d = decide(_summary(**UNLABELLED), RULE, ev, candidate_right)
    assert d.accepted and "40 of 40 asked disagreements labelled (40 right by the candidate only" in d.reason
    teacher_right = {str(i): 0 for i in range(40)}
    d = decide(_summary(**UNLABELLED), RULE, ev, teacher_right)
    assert d.verdict is Verdict.REJECTED and "worse than max_accuracy_drop" in d.reason
    # every asked label in and still undecided: rejected
    d = decide(_summary(**UNLABELLED), RULE, ev, {str(i): i % 2 for i in range(40)})
    assert d.verdict is Verdict.REJECTED and "with every asked label in" in d.reason


def test_without_disagreements_to_ask_or_with_asking_off_it_is_rejected():
    assert decide(_summary(**UNLABELLED), RULE, _evidence(disagreements=60, asked=0)).verdict is Verdict.REJECTED
    off = Acceptance(0.01, 0.05, 0.99, 200, max_asked=0)
    assert decide(_summary(**UNLABELLED), off, _evidence(disagreements=60)).verdict is Verdict.REJECTED


def test_sparse_labels_go_to_paired_evidence_even_with_an_uncorrected_teacher():
    """Issue 29: 15 labelled judging samples accepted a candidate that answered like the served model on
    70 % of them, with an uncorrected teacher. Now a few labels only veto; the paired evidence decides."""
    few = dict(held_out_labelled=15, held_out_samples=300, teacher={"corrected": False}, agreement_with_before=0.7,
               top1_before=0.60, top1_after=0.7333)
    assert decide(_summary(**few), RULE)[0]  # the summary-only rule (no paired evidence) still accepts
    d = decide(_summary(**few), RULE, _evidence(samples=300, disagreements=90, loss=0.0))
    assert d.pending
    assert decide(_summary(**{**few, "top1_after": 0.5}), RULE, _evidence()).verdict is Verdict.REJECTED  # labels veto
    # plenty of labels: they decide
    assert decide(_summary(**{**few, "held_out_labelled": 250}), RULE, _evidence(samples=300, disagreements=90)).accepted
