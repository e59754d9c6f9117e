"""The world changes, end to end on a real daemon: unlabelled traffic of three digits; a cycle
specialises on it; then a fourth digit appears, and within a bounded number of images the daemon
serves the generalist again, which recognises it. Both events are in /cycles and /metrics."""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import DEVICE_CLASSES, png_bytes
from prune_core import batches, load_model

pytestmark = pytest.mark.slow


def test_new_class_brings_the_generalist_back(make_daemon, device_images, digits, base_model_dir):
    d = make_daemon({"EDGETUNE_MAX_ACCURACY_DROP": "1", "EDGETUNE_DRIFT_SAMPLE_EVERY": "1", "EDGETUNE_PRIOR_MIN_SAMPLES": "40", "EDGETUNE_CYCLE_MIN_STEPS": "0"}).start()
    for png, _ in device_images[:150]:  # unlabelled traffic of 1, 4, 7
        assert d.infer(png).status_code == 200
    shift = d.client.get("/status").json()["label_shift"]
    assert shift["applied"], shift
    assert sum(shift["estimate"][str(c)] for c in DEVICE_CLASSES) > 0.8, shift["estimate"]

    cycle = d.client.post("/prune", json={"force": True}).json()["cycle_id"]
    record = d.wait_cycle(cycle, ("accepted", "rejected", "failed", "aborted"))
    assert record["state"] == "accepted", record
    assert record["metrics"]["evidence"] == "agreement" and record["metrics"]["teacher"]["corrected"], record["metrics"]
    assert record["reason"].startswith("paired evidence: against the prior-corrected served model")
    specialist = json.loads((d.state_dir / "models" / record["version_after"] / "model.json").read_text())
    # the new class: the one the specialist was trained for least (well under drift_trained_share)
    new = min((c for c in range(10) if c not in DEVICE_CLASSES), key=lambda c: specialist["class_prior"][c])
    assert specialist["class_prior"][new] < 0.02

    fresh = torch.nonzero(digits.labels == new).flatten()[-200:].tolist()
    served_by = []
    for n, i in enumerate(fresh[:150], 1):  # only the new digit now
        reply = d.infer(png_bytes(digits.images[i])).json()
        served_by.append(reply["model_version"])
        if reply["model_version"] == "v0001":
            break
    assert served_by[-1] == "v0001", f"still {served_by[-1]} after {len(served_by)} images of digit {new}"

    # the generalist's own accuracy on the new digit, and what the daemon now answers
    model, card = load_model(base_model_dir)
    rest = digits.subset(fresh[150:])
    with torch.no_grad():
        own = float((torch.cat([model(x).argmax(1) for x, _ in batches(rest, 64, card.mean, card.std)]) == new).float().mean())
    answers = [d.infer(png_bytes(img)).json()["top"][0]["class"] for img in rest.images]
    assert sum(a == str(new) for a in answers) / len(answers) >= own - 0.02

    cycles = d.client.get("/cycles").json()
    drift = [c for c in cycles if c["trigger"] == "drift"]
    assert len(drift) == 1 and drift[0]["version_before"] == record["version_after"] and drift[0]["version_after"] == "v0001"
    assert f"{new} at" in drift[0]["reason"]
    metrics = d.client.get("/metrics").text
    assert re.search(r"^edgetune_generalist_fallbacks_total 1\.0$", metrics, re.M)
    assert re.search(r'^edgetune_cycles_total\{outcome="accepted"\} 1\.0$', metrics, re.M)
