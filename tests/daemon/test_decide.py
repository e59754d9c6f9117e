"""daemon.worker.decide: the acceptance rule, on the evidence the cycle had."""
from __future__ import annotations

from daemon.worker import decide

NAN = float("nan")


def _summary(**kw) -> dict:
    return {"params_before": 1000, "params_after": 200, "top1_before": 0.80, "top1_after": 0.80,
            "agreement_with_before": 1.0, "evidence": "labels", **kw}


def test_size_gain_comes_first():
    ok, why = decide(_summary(params_after=990), max_drop=0.01, min_gain=0.05, min_agreement=0.99)
    assert not ok and why.startswith("size gain 0.010")


def test_labels_decide_where_the_held_out_split_has_them():
    assert decide(_summary(top1_after=0.795), 0.01, 0.05, 0.99)[0]
    ok, why = decide(_summary(top1_after=0.78, agreement_with_before=1.0), 0.01, 0.05, 0.99)
    assert not ok and why.startswith("labels:")


def test_without_labels_agreement_with_the_corrected_teacher_decides():
    unlabelled = dict(evidence="agreement", top1_before=NAN, top1_after=NAN, teacher={"corrected": True})
    ok, why = decide(_summary(agreement_with_before=0.995, **unlabelled), 0.01, 0.05, 0.99)
    assert ok and why.startswith("no labels: agreement 0.9950 with the prior-corrected served model")
    ok, why = decide(_summary(agreement_with_before=0.956, **unlabelled), 0.01, 0.05, 0.99)
    assert not ok and "below min_agreement 0.99" in why
    # a summary from before evidence was recorded: NaN top-1 means no labels
    assert not decide(_summary(agreement_with_before=0.5, top1_before=NAN, top1_after=NAN, evidence="labels"), 0.01, 0.05, 0.99)[0]
