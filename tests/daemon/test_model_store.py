"""daemon.storage.model_store: which versions are kept."""
from __future__ import annotations

from daemon.storage.model_store import ModelStore
from prune_core.model_format import MODEL_JSON


def _store(tmp_path, keep: int, count: int) -> ModelStore:
    store = ModelStore(tmp_path / "models", keep)
    for i in range(1, count + 1):
        folder = store.path(f"v{i:04d}")
        folder.mkdir()
        (folder / MODEL_JSON).write_text("{}")
    return store


def test_the_generalist_and_protected_versions_outlive_keep_versions(tmp_path):
    store = _store(tmp_path, keep=2, count=5)
    assert store.generalist() == "v0001"
    assert store.remove_stale(protect={"v0005", "v0004"}) == ["v0002", "v0003"]
    assert store.versions() == ["v0001", "v0004", "v0005"]  # the generalist, and the newest two it protects
    assert store.remove_stale(protect={"v0005"}) == ["v0004"]
    assert store.versions() == ["v0001", "v0005"]  # keep_versions = 2, the generalist among them
    assert store.remove_stale(protect=set()) == [] and store.generalist() == "v0001"
