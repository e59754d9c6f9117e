"""The device's class prior in the daemon: spot checks of both answers, carry-over across an engine rebuild's
swap (in process), and across a restart (a real `edgetune serve`, stopped and started on its state dir)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import DEVICE_CLASSES, noise_png


def _infer(client, data: bytes, label: str | None = None):
    r = client.post("/infer", content=data, params={"label": label} if label else {}, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()


def test_spot_checks_count_both_answers_and_the_estimate_outlives_a_rebuild_and_a_swap(make_inproc):
    d = make_inproc(prior_min_samples=10)
    for k in range(40):
        _infer(d.client, noise_png(k))
    d.tick()
    shift = d.client.get("/status").json()["label_shift"]
    assert shift["estimate"] is not None and shift["samples"] == 40 and shift["changes"] == 0
    for k in range(40, 46):  # labelled: whichever answer is served, both are scored
        _infer(d.client, noise_png(k), "3")
    spots = d.client.get("/status").json()["label_shift"]["spot_check"]
    assert spots["labelled"] == 6
    served = d.rt.served()
    d.rt.installer.upgrade(served.version)  # what a finished background engine build does: a new Served
    assert d.rt.served() is not served and d.rt.served().prior is served.prior
    d.tick()
    again = d.client.get("/status").json()["label_shift"]
    assert again["samples"] == 46 and again["spot_check"]["labelled"] == 6
    assert np.allclose(list(again["estimate"].values()), list(shift["estimate"].values()), atol=0.2)
    other = d.rt.store.import_model(d.rt.store.path(served.version))  # a swap to another version
    assert d.client.post(f"/models/{other}/activate").status_code == 200
    for k in range(46, 50):
        _infer(d.client, noise_png(k))
    d.tick()
    swapped = d.client.get("/status").json()["label_shift"]
    assert d.rt.served().version == other and swapped["samples"] == 50 and swapped["changes"] == 0
    metrics = d.client.get("/metrics").text
    for name in ("edgetune_prior_scene_samples 50.0", "edgetune_prior_scene_changes 0.0", "edgetune_prior_expected_gain"):
        assert name in metrics, name


@pytest.mark.slow
def test_the_estimate_and_correction_survive_a_restart(make_daemon, device_images):
    """Stream the device's three digits, stop the daemon, start it again: before any new image, /status shows
    the estimate and correction on (rebuilt from the buffer's answers)."""
    d = make_daemon().start()
    for png, _ in device_images[:150]:
        assert d.infer(png).status_code == 200
    deadline = time.monotonic() + 20
    while not (shift := d.client.get("/status").json()["label_shift"])["applied"]:
        assert time.monotonic() < deadline, shift
        time.sleep(0.2)
    assert sum(shift["estimate"][str(c)] for c in DEVICE_CLASSES) > 0.8, shift["estimate"]
    d.stop()
    d.start()
    after = d.client.get("/status").json()["label_shift"]
    assert after["applied"] and after["samples"] == 150, after
    assert max(abs(after["estimate"][c] - shift["estimate"][c]) for c in after["estimate"]) < 0.05
