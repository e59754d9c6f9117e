"""Model versions on disk: `models/<version>/` (prune_core's model format) and an `active` pointer
switched atomically (write temp, fsync, rename, fsync dir). Version names are `v` + digits, and
nothing outside `models/` is ever loaded."""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from prune_core.model_format import (
    MODEL_JSON, WEIGHTS, ModelCard, ModelFormatError, atomic_write, fsync_dir, load_model, read_card,
)

VERSION_RE = re.compile(r"^v\d{4,9}$")


class UnknownVersion(KeyError):
    pass


class ModelStore:
    def __init__(self, models_dir: Path, keep: int = 5):
        self.dir = Path(models_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.pointer = self.dir / "active"

    def path(self, version: str) -> Path:
        """The directory of `version`; rejects anything that is not a plain version name."""
        if not VERSION_RE.match(version or ""):
            raise UnknownVersion(f"'{version}' is not a version name (v0001, v0002, …)")
        return self.dir / version

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and VERSION_RE.match(p.name) and (p / MODEL_JSON).is_file())

    def active(self) -> str | None:
        try:
            name = self.pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return name if VERSION_RE.match(name) and (self.dir / name).is_dir() else None

    def set_active(self, version: str) -> None:
        target = self.path(version)
        if not (target / MODEL_JSON).is_file():
            raise UnknownVersion(f"no model version '{version}'")
        atomic_write(self.pointer, lambda tmp: Path(tmp).write_text(version + "\n"))

    def next_version(self) -> str:
        numbers = [int(v[1:]) for v in self.versions()]
        return f"v{(max(numbers) + 1 if numbers else 1):04d}"

    def staging_dir(self) -> Path:
        """A fresh hidden directory to write a candidate into before `commit`."""
        path = self.dir / f".staging-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def commit(self, staging: Path) -> str:
        """Give a fully written staging directory the next version name (atomic rename)."""
        version = self.next_version()
        os.replace(staging, self.dir / version)
        fsync_dir(self.dir)
        return version

    def import_model(self, source: Path) -> str:
        """Copy a prune_core model directory in as a new version (validated by loading it)."""
        load_model(source)  # raises ModelFormatError on anything wrong
        staging = self.staging_dir()
        for name in (MODEL_JSON, WEIGHTS):
            shutil.copyfile(Path(source) / name, staging / name)
            with open(staging / name, "rb+") as fh:
                os.fsync(fh.fileno())
        return self.commit(staging)

    def card(self, version: str) -> ModelCard:
        return read_card(self.path(version))

    def remove_stale(self, protect: set[str]) -> list[str]:
        """Delete leftover staging dirs and versions beyond the newest `keep` (never `protect`)."""
        for leftover in self.dir.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.dir.glob(".active.*"):
            leftover.unlink(missing_ok=True)
        removed = []
        versions = self.versions()
        for version in versions[: max(0, len(versions) - self.keep)]:
            if version not in protect:
                shutil.rmtree(self.dir / version, ignore_errors=True)
                removed.append(version)
        return removed

    def last_good(self, exclude: set[str] = frozenset()) -> list[str]:
        """Versions newest first, for falling back when the active one will not load."""
        return [v for v in reversed(self.versions()) if v not in exclude]


__all__ = ["ModelStore", "UnknownVersion", "ModelFormatError", "VERSION_RE"]
