"""Start-up: settle the cycles the daemon died in.

A cycle that died while installing an accepted model whose directory was already committed is
completed (that version is installed); one that died training with a checkpoint written (in
`checkpoints`/<id>) is queued again, to resume on the same snapshot (scheduler.py); every other is
marked failed with the state it was in."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from prune_core.card import ModelFormatError

from ..serving.installer import Installer
from .cycle_records import CycleStore
from .cycle_state import CycleState

log = logging.getLogger("edgetune.recovery")


def recover_interrupted(cycles: CycleStore, installer: Installer, checkpoints: Path | None = None) -> None:
    for record in cycles.list():
        if record.state.final:
            continue
        record.finished = time.time()
        version = record.version_after
        if version is not None and version in installer.store.versions():
            try:
                installer.install(version)
            except (ModelFormatError, OSError, RuntimeError) as exc:
                log.error("cycle %s: committed version %s does not load: %s", record.id, version, exc)
                installer.discard(version)
            else:
                record.state = CycleState.ACCEPTED
                record.reason = f"{record.reason or 'accepted'}; the daemon stopped during the install, completed on restart"
                cycles.save(record)
                log.warning("cycle %s: install of %s completed after a restart", record.id, version)
                continue
        step = f" ({record.step})" if record.step else ""
        saved = checkpoints / record.id if checkpoints is not None else None
        if (record.state in (CycleState.RUNNING, CycleState.PAUSED) and version is None and saved is not None
                and saved.is_dir() and any(saved.iterdir())):
            record.state, record.finished = CycleState.QUEUED, None
            record.reason = f"resumes from its checkpoint: the daemon stopped while the cycle was running{step}"
            cycles.save(record)
            log.warning("cycle %s: resumes from its checkpoint after a restart", record.id)
            continue
        record.reason = f"interrupted: the daemon stopped while the cycle was {record.state.value}{step}"
        record.state, record.version_after = CycleState.FAILED, None
        cycles.save(record)
