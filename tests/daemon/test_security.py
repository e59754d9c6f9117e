"""Who may do what: a token guards every mutating request once configured (and is required to
bind beyond loopback), version and cycle names cannot walk out of the state dir, and no pickle
is ever unpickled."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from daemon.storage.model_store import ModelStore, UnknownVersion
from prune_core.model_format import ModelFormatError, load_model

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, base_model_dir):
    import conftest  # tests/daemon/conftest.py

    d = conftest.Daemon(tmp_path_factory.mktemp("guarded") / "state", base_model_dir,
                        {"EDGETUNE_HOST": "0.0.0.0", "EDGETUNE_API_TOKEN": TOKEN}).start()
    yield d
    d.stop()


MUTATING = [
    ("POST", "/infer", {"content": b"x", "headers": {"content-type": "image/png"}}),
    ("POST", "/samples", {"json": {"samples": [{"image": "aGk="}]}}),
    ("POST", "/samples/1/label", {"json": {"label": "1"}}),
    ("POST", "/prune", {"json": {"level": 0.5}}),
    ("GET", "/prune", {}),
    ("POST", "/models/v0001/activate", {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,path,kw", MUTATING, ids=[f"{m} {p}" for m, p, _ in MUTATING])
def test_mutating_endpoints_demand_the_token(guarded, method, path, kw):
    before = len(guarded.client.get("/cycles").json())
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}, {"authorization": f"Basic {TOKEN}"}):
        r = guarded.client.request(method, path, **{**kw, "headers": {**kw.get("headers", {}), **headers}})
        assert r.status_code == 401, (headers, r.text)
        assert "token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert len(guarded.client.get("/cycles").json()) == before  # none of it started a cycle
    r = guarded.client.request(method, path, **{**kw, "headers": {**kw.get("headers", {}), "authorization": f"Bearer {TOKEN}"}})
    assert r.status_code != 401, r.text


@pytest.mark.slow
def test_reads_need_no_token_and_the_bind_is_not_loopback(guarded):
    for path in ("/healthz", "/readyz", "/status", "/models", "/cycles", "/metrics", "/openapi.json"):
        assert guarded.client.get(path).status_code == 200, path
    assert "0.0.0.0" in guarded.log.read_text()  # listening on all interfaces, with a token


TRAVERSAL = ["..", "...", "../..", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "v0001%2F..%2F..", "v0001%0A", "v0001%00",
             "v1", "V0001", "v0001.bak", "%2E%2E", "active", ".staging-x", "v0001%20"]


def raw_request(daemon, method: str, path: str) -> int:
    """The path exactly as given: an HTTP client would resolve `..` segments before sending
    (`/cycles/..` becomes `/`), an attacker's need not (`curl --path-as-is`)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAVERSAL)
def test_version_and_cycle_names_cannot_escape(shared_daemon, name):
    for suffix in ("/activate", "/report", "/report.png"):
        method = "POST" if suffix == "/activate" else "GET"
        base = "/models" if suffix == "/activate" else "/cycles"
        status = raw_request(shared_daemon, method, f"{base}/{name}{suffix}")
        assert status in (404, 405, 422), (name, suffix, status)
    assert raw_request(shared_daemon, "GET", f"/cycles/{name}") in (404, 405), name
    assert shared_daemon.client.get("/status").json()["model"]["version"] == "v0001"


def test_model_store_only_resolves_plain_version_names(tmp_path):
    store = ModelStore(tmp_path / "models")
    assert store.path("v0001") == tmp_path / "models" / "v0001"
    for bad in ("../x", "v0001/../../x", "/etc", "v0001\n", "v0001\x00", "", "v01"):
        with pytest.raises(UnknownVersion):
            store.path(bad)


def test_no_code_path_unpickles():
    """Every torch.load passes weights_only=True; nothing calls pickle/joblib/numpy loaders that unpickle."""
    offenders = []
    for path in [*REPO.glob("prune_core/**/*.py"), *REPO.glob("daemon/**/*.py"), *REPO.glob("bench/**/*.py")]:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path}: {match.group(0)}")
        for pattern in (r"pickle\.loads?\(", r"joblib\.load\(", r"allow_pickle\s*=\s*True", r"dill\.", r"cloudpickle\."):
            offenders += [f"{path}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create the marker file


def test_a_pickled_weights_file_is_refused_without_running_it(tmp_path, untrained_model_dir):
    model = tmp_path / "model"
    shutil.copytree(untrained_model_dir, model)
    marker = tmp_path / "pwned"
    weights = model / "weights.safetensors"
    with open(weights, "wb") as fh:
        pickle.dump({"conv.weight": _Exploit(str(marker)), "t": torch.zeros(1)}, fh)
    data = json.loads((model / "model.json").read_text())
    data["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # so the checksum passes
    (model / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="unreadable safetensors"):
        load_model(model)
    assert not marker.exists()
    torch.save({"w": torch.zeros(1)}, weights)  # a torch (zip+pickle) file is refused the same way
    data["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (model / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="unreadable safetensors"):
        load_model(model)
    assert not os.path.exists(marker)
