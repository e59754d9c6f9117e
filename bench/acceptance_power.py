"""How the acceptance rule (daemon/cycles/acceptance.py) decides on paired evidence, by simulation: for a
candidate that disagrees with its teacher on a share d of the traffic and loses a true top-1 L
against it, how often it is accepted without a label, accepted or rejected after the labels of its
disagreements (asked one at a time, the rule re-checked after each, as the daemon does), or left
undecided, and how many labels that took. No model: the judging samples' disagreements and the
labels are drawn from those rates, so this measures the statistics, not a student.

    nice python bench/acceptance_power.py [--runs 100] [--samples 2000] [--seed 0]

On each disagreement the teacher alone is right with probability (r + L/d)/2 and the candidate
alone with (r - L/d)/2, r = 0.8 (both wrong otherwise). The calibrated teacher's expected loss is
drawn around the true loss with the spread the bench/RESULTS.md measurements put on it (0.003), or
left out (an uncorrected teacher) where the column says so.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.cycles.acceptance import Acceptance, Verdict, decide  # noqa: E402
from prune_core.evidence import Calibration, Disagreement, JudgingEvidence  # noqa: E402

RULE = Acceptance(max_drop=0.01, min_gain=0.05, min_agreement=0.99, min_label_evidence=200)  # the daemon's defaults
SUMMARY = {"params_before": 2, "params_after": 1, "top1_before": float("nan"), "top1_after": float("nan"), "evidence": "agreement"}
BOTH_RIGHT_ONE = 0.8  # share of disagreements where exactly one of the two is right


def one_run(rng: random.Random, n: int, d: float, loss: float, corrected: bool) -> tuple[str, int]:
    k = sum(rng.random() < d for _ in range(n))
    asked = tuple(Disagreement(str(i), 0, 1) for i in range(min(k, RULE.max_asked)))
    expected = loss + rng.gauss(0, 0.003) if corrected else float("nan")
    ev = JudgingEvidence(n, k, expected, 0.002 if corrected else float("nan"), Calibration(), asked)
    summary = {**SUMMARY, "teacher": {"corrected": corrected}}
    decision = decide(summary, RULE, ev)
    if not decision.pending:
        return ("free-" if decision.accepted else "") + decision.verdict.value, 0
    teacher_only = (BOTH_RIGHT_ONE + loss / d) / 2
    student_only = (BOTH_RIGHT_ONE - loss / d) / 2
    labels: dict[str, int] = {}
    for item in asked:
        u = rng.random()
        labels[item.key] = 0 if u < teacher_only else 1 if u < teacher_only + student_only else 2
        decision = decide(summary, RULE, ev, labels)
        if not decision.pending:
            return decision.verdict.value, len(labels)
    return Verdict.PENDING.value, len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--samples", type=int, default=2000, help="judging samples per cycle")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"{args.runs} cycles per row, {args.samples} judging samples, max_accuracy_drop {RULE.max_drop}, "
          f"confidence {RULE.confidence}, at most {RULE.max_asked} labels")
    print("| teacher | disagree | true loss | accepted, no label | accepted after labels | rejected | labels asked (mean) |")
    print("|---|---|---|---|---|---|---|")
    for corrected in (True, False):
        for d in (0.02, 0.05, 0.13):
            for loss in (-0.01, 0.0, 0.005, 0.02):
                if abs(loss) > d * BOTH_RIGHT_ONE:
                    continue
                out = [one_run(rng, args.samples, d, loss, corrected) for _ in range(args.runs)]
                share = lambda v: sum(o[0] == v for o in out) / len(out)  # noqa: E731
                labels = sum(n for _, n in out) / len(out)
                print(f"| {'calibrated' if corrected else 'uncalibrated'} | {d:.2f} | {loss:+.3f} | {share('free-accepted'):.2f} | "
                      f"{share('accepted'):.2f} | {share('rejected'):.2f} | {labels:.0f} |", flush=True)


if __name__ == "__main__":
    main()
