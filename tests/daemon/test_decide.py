"""daemon.acceptance.decide: the acceptance rule, on the evidence the cycle had."""
from __future__ import annotations

from daemon.acceptance import Acceptance, decide

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
    from daemon.config import Settings
    s = Settings()
    assert Acceptance.of(s) == Acceptance(s.max_accuracy_drop, s.min_size_gain, s.min_agreement, s.min_label_evidence)


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
