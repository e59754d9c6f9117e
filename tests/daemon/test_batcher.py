"""Dynamic batching: real models through daemon.serving.batcher, and through /infer in process. Batches
are made deterministic by holding the first forward pass until the rest have queued; nothing here
asserts a duration."""
from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import noise_png as png

from daemon.serving.batcher import Batcher, BatchSettings, InferenceError
from daemon.serving.serving import load_served
from prune_core import ModelCard, build_model, save_model
from prune_core.datasets import MNIST_CLASSES


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (3, 32, 32), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def two_models(untrained_model_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other") / "model"
    torch.manual_seed(1)
    save_model(build_model("cifar_small", 10), ModelCard("cifar_small", 10, MNIST_CLASSES, 32), other)
    cpu = torch.device("cpu")
    return load_served("v0001", untrained_model_dir, cpu), load_served("v0002", other, cpu)


class Broken:
    """An engine whose forward pass fails."""

    device = "cpu"

    def logits(self, images):
        raise RuntimeError("out of memory (simulated by the model)")


class Held:
    """A forward pass that records each batch, and holds the first one until released, so every
    request sent meanwhile is already queued when the batcher next looks."""

    def __init__(self, run=lambda served, images: served.predict(images)):
        self.run = run
        self.batches: list[tuple[str, int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, served, batch: np.ndarray):
        self.batches.append((served.version, len(batch)))
        self.entered.set()
        self.release.wait(30)
        return self.run(served, batch)


def held_batcher(served, first_image: np.ndarray, **settings) -> tuple[Batcher, Held, Future]:
    """A started Batcher whose first forward pass (of `first_image`) is held: what is submitted
    next queues behind it."""
    held = Held()
    b = Batcher(BatchSettings(**settings), run=held)
    b.start()
    first = b.submit(served, lambda: first_image)
    assert held.entered.wait(30)
    return b, held, first


def same(a, b) -> None:
    """Two answers to one image: the same classes, scores equal up to float rounding."""
    assert [i for i, _ in a.top] == [i for i, _ in b.top] and a.raw_pred == b.raw_pred
    np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], rtol=1e-4, atol=1e-6)


def test_batches_are_bounded_one_model_each_and_answer_like_single_passes(two_models):
    m1, m2 = two_models
    held = Held()
    b = Batcher(BatchSettings(max_batch=4, max_queue_delay_s=0.0), run=held)
    b.start()
    try:
        pics = images(19)
        owners = [m1 if k % 3 else m2 for k in range(19)]  # mixed traffic, as during a hot-swap
        first = b.submit(owners[0], lambda: pics[0])
        assert held.entered.wait(30)
        futures = [first] + [b.submit(m, lambda x=x: x) for m, x in zip(owners[1:], pics[1:])]
        wait_for(lambda: b.waiting == 18)  # all queued behind the held pass
        held.release.set()
        answers = [f.result(30).answer for f in futures]
    finally:
        b.stop()
    assert sum(n for _, n in held.batches) == 19
    assert max(n for _, n in held.batches) <= 4
    assert any(n > 1 for _, n in held.batches)  # 18 requests were queued: they ran together
    for answer, m, x in zip(answers, owners, pics):
        same(answer, m.predict(x[None], track=False)[0])


def test_predict_errors_reach_every_waiting_request_and_the_thread_lives_on(two_models):
    good, _ = two_models

    bad = dataclasses.replace(good, version="v0009", engine=Broken())
    b, held, first = held_batcher(bad, images(1)[0], max_batch=8)
    try:
        failing = [first] + [b.submit(bad, lambda x=x: x) for x in images(5, seed=1)]
        fine = b.submit(good, lambda: images(1, seed=2)[0])
        wait_for(lambda: b.waiting == 6)
        held.release.set()
        for f in failing:
            with pytest.raises(InferenceError, match="out of memory"):
                f.result(30)
        assert fine.result(30).answer.top  # the other model's request in the same gathering still answered
        assert b.submit(good, lambda: images(1, seed=3)[0]).result(30).answer.top  # and the thread still serves
    finally:
        b.stop()


def test_max_batch_1_is_one_forward_pass_per_request(two_models):
    import asyncio

    m1, _ = two_models
    sizes: list[int] = []
    b = Batcher(BatchSettings(max_batch=1), on_batch=sizes.append)
    b.start()
    x = images(1)[0]
    result = asyncio.run(b.answer(m1, lambda: x))
    assert result.image is x
    same(result.answer, m1.predict(x[None], track=False)[0])
    assert sizes == [1] and not b.batching
    b.stop()


def test_stop_answers_what_was_submitted_and_refuses_the_rest(two_models):
    m1, _ = two_models
    b, held, first = held_batcher(m1, images(1)[0], max_batch=8)
    queued = [b.submit(m1, lambda x=x: x) for x in images(3, seed=1)]
    wait_for(lambda: b.waiting == 3)
    undecodable = b.submit(m1, lambda: (_ for _ in ()).throw(ValueError("not an image")))
    with pytest.raises(ValueError, match="not an image"):  # the preparer's own error, not an InferenceError
        undecodable.result(30)
    held.release.set()
    b.stop()
    assert all(f.result(0).answer.top for f in [first] + queued)  # stop() returned once they were answered
    with pytest.raises(InferenceError, match="not running"):
        b.submit(m1, lambda: images(1)[0]).result(30)


def test_a_request_given_up_on_cannot_break_its_batch(two_models):
    """A request whose caller gives up (a cancelled future, as when the awaiting task is cancelled)
    once it is queued stays answerable, so the rest of its batch is answered."""
    m1, _ = two_models
    b, held, first = held_batcher(m1, images(1)[0], max_batch=8)
    try:
        queued = [b.submit(m1, lambda x=x: x) for x in images(3, seed=1)]
        wait_for(lambda: b.waiting == 3)
        assert not queued[0].cancel()  # running: the batch will set its result
        held.release.set()
        assert all(f.result(30).answer.top for f in [first] + queued)
    finally:
        b.stop()


def wait_for(condition, timeout: float = 60) -> None:
    done = threading.Event()
    for _ in range(int(timeout * 100)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition never met")


# ---- through /infer, in process ---------------------------------------------------------------------
def post(c, k: int, **params):
    return c.post("/infer", content=png(k), headers={"content-type": "image/png"}, params=params)


def test_concurrent_requests_answer_as_sequential_ones(make_inproc):
    seq = make_inproc(max_batch=1)
    conc = make_inproc(max_batch=8, max_queue_delay_ms=20)
    expected = [post(seq.client, k).json() for k in range(24)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda k: post(conc.client, k).json(), range(24)))
    for e, g in zip(expected, got):
        assert [t["class"] for t in g["top"]] == [t["class"] for t in e["top"]]
        np.testing.assert_allclose([t["score"] for t in g["top"]], [t["score"] for t in e["top"]], rtol=1e-4, atol=1e-6)
    metrics = conc.client.get("/metrics").text
    assert "edgetune_inference_batch_size_count" in metrics and "edgetune_inference_latency_seconds_count 24.0" in metrics


def test_requests_keep_answering_across_swaps_and_a_broken_model_is_a_500(make_inproc, two_models):
    d = make_inproc(max_batch=8)
    _, other = two_models
    v1 = d.rt.served()
    stop = threading.Event()
    statuses: list[tuple[int, str]] = []

    def client(k: int) -> None:
        while not stop.is_set():
            r = post(d.client, k)
            statuses.append((r.status_code, r.json().get("model_version", "")))

    with ThreadPoolExecutor(4) as pool:
        for k in range(4):
            pool.submit(client, k)
        for i in range(20):  # each swap lands while requests are in flight: wait for answers between them
            d.rt.holder.swap(other if i % 2 == 0 else v1)
            wait_for(lambda n=len(statuses): len(statuses) >= n + 3)
        stop.set()
    assert {s for s, _ in statuses} == {200}, statuses
    assert {v for _, v in statuses} <= {"v0001", "v0002"}

    d.rt.holder.swap(dataclasses.replace(v1, version="v0009", engine=Broken()))
    with ThreadPoolExecutor(4) as pool:
        failed = list(pool.map(lambda k: post(d.client, k), range(8)))
    assert all(r.status_code == 500 and "out of memory" in r.json()["detail"] for r in failed), [r.text for r in failed]
    d.rt.holder.swap(v1)
    assert post(d.client, 1).status_code == 200  # the batching thread survived
