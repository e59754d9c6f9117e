"""Model versions on disk: `models/<version>/` (prune_core's model format) and an `active` pointer
switched atomically (write temp, fsync, rename, fsync dir). Version names are `v` + digits, and
nothing outside `models/` is ever loaded."""
from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from prune_core.atomic import atomic_write, fsync_dir
from prune_core.card import MODEL_JSON, WEIGHTS, ModelCard, ModelFormatError, read_card

VERSION_RE = re.compile(r"v\d{4,9}")  # always used with fullmatch
LEFTOVER_GLOBS = (".staging-*", ".trash-*", ".active.*")
log = logging.getLogger("edgetune.store")


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
        if not VERSION_RE.fullmatch(version or ""):
            raise UnknownVersion(f"'{version}' is not a version name (v0001, v0002, …)")
        return self.dir / version

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and VERSION_RE.fullmatch(p.name) and (p / MODEL_JSON).is_file())

    def generalist(self) -> str | None:
        """The first version the device was given (the oldest kept): never removed, served again
        when traffic holds classes a specialised version was not trained for."""
        versions = self.versions()
        return versions[0] if versions else None

    def active(self) -> str | None:
        try:
            name = self.pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return name if VERSION_RE.fullmatch(name) and (self.dir / name).is_dir() else None

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

    def commit(self, staging: Path, version: str | None = None) -> str:
        """Give a fully written staging directory a version name (the next one unless given) by
        an atomic rename. Its files were written with `atomic_write` (save_model, import_model),
        so they are durable before the rename and the renamed directory is complete."""
        version = version or self.next_version()
        target = self.path(version)
        if target.exists():
            raise FileExistsError(f"model version {version} already exists")
        os.replace(staging, target)
        fsync_dir(self.dir)
        return version

    def import_model(self, source: Path) -> str:
        """Copy a prune_core model directory in as a new version (validated by loading it)."""
        from prune_core.model_format import load_model  # torch: only an import pays for it

        load_model(source)  # raises ModelFormatError on anything wrong
        staging = self.staging_dir()
        for name in (MODEL_JSON, WEIGHTS):
            atomic_write(staging / name, lambda tmp, name=name: shutil.copyfile(Path(source) / name, tmp))
        return self.commit(staging)

    def card(self, version: str) -> ModelCard:
        return read_card(self.path(version))

    def remove(self, version: str) -> None:
        """Delete a version: renamed out of the version namespace first (atomic), so a crash
        mid-delete never leaves a half-deleted directory that looks like a version."""
        trash = self.dir / f".trash-{version}-{uuid.uuid4().hex[:6]}"
        os.replace(self.path(version), trash)
        fsync_dir(self.dir)
        shutil.rmtree(trash, ignore_errors=True)

    def remove_stale(self, protect: set[str]) -> list[str]:
        """Delete leftovers of interrupted writes (staging dirs, deletions, pointer temp files)
        and versions beyond the newest `keep` (never `protect`). Best effort: a read-only state
        directory is left as it is."""
        try:
            for leftover in (p for pattern in LEFTOVER_GLOBS for p in self.dir.glob(pattern)):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            removed = []
            versions = self.versions()
            # the generalist (the first version) always stays: the newest `keep - 1` others beside it
            for version in versions[1:][: max(0, len(versions) - self.keep)]:
                if version not in protect:
                    self.remove(version)
                    removed.append(version)
        except OSError as exc:
            log.warning("could not clean up %s: %s", self.dir, exc)
            return []
        return removed

    def last_good(self, exclude: set[str] = frozenset()) -> list[str]:
        """Versions newest first, for falling back when the active one will not load."""
        return [v for v in reversed(self.versions()) if v not in exclude]


__all__ = ["ModelStore", "UnknownVersion", "ModelFormatError", "VERSION_RE"]
