"""The sample buffer: images as received, in SQLite (WAL, synchronous=FULL), bounded and class-balanced.

Ingest is a group commit: request handlers hand samples to one writer thread, which commits
whatever has queued up in one transaction. A handler that must not answer before the row is
committed (bulk ingest, labelled samples) awaits its future (`submit`), so its 2xx survives
kill -9. Unlabelled /infer samples are handed over without waiting (`offer`): at most
`background_limit` of them wait for a commit at a time, beyond that `offer` refuses and the
caller drops the sample, so a slow disk never holds up inference nor grows memory without bound.
"""
from __future__ import annotations

import hashlib
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

import sqlite_utils

SCHEMA_VERSION = 2


@dataclass
class NewSample:
    """A sample on its way in. `label`/`pred` are class indices; None when unknown."""

    image: bytes
    media_type: str
    label: int | None = None
    pred: int | None = None
    confidence: float | None = None
    model_version: str | None = None
    source: str = "infer"
    likelihood: bytes | None = None  # the answer's likelihood row (float32 K): the prior estimate is rebuilt from it at start
    raw_pred: int | None = None  # the uncorrected argmax (`pred` is the served, maybe prior-corrected, one)


@dataclass
class Stored:
    id: int
    duplicate: bool  # the same image was already buffered; no new row


class DropReason(str, Enum):
    """Why an offered sample was not buffered (the label of edgetune_samples_dropped_total)."""

    QUEUE_FULL = "queue_full"  # background_limit samples were already waiting
    STORAGE_ERROR = "storage_error"  # its group commit failed (disk full, read-only)


class StorageError(RuntimeError):
    """The state directory refused a write; `http_status` is how the API answers it."""

    http_status = 503


class BufferFull(StorageError):
    """No space left (disk full or SQLite's own limit): 507 Insufficient Storage."""

    http_status = 507


class BufferReadOnly(StorageError):
    """The state directory is read-only (e.g. remounted after file system errors): 503."""

    http_status = 503


def storage_error(exc: BaseException, doing: str) -> StorageError | None:
    """Classify an SQLite or OS error as a storage fault, or None when it is something else."""
    text = str(exc).lower()
    errno_ = getattr(exc, "errno", None)
    if "full" in text or errno_ == 28:  # SQLITE_FULL, ENOSPC
        return BufferFull(f"sample buffer full: no space left in the state directory, {doing} ({exc})")
    if "readonly" in text or "read-only" in text or errno_ == 30:  # SQLITE_READONLY, EROFS
        return BufferReadOnly(f"state directory is read-only, {doing} ({exc})")
    if "disk i/o" in text or "unable to open" in text or isinstance(exc, OSError):
        return BufferReadOnly(f"state directory cannot be written, {doing} ({exc})")
    return None


def _migration_1(db: sqlite_utils.Database) -> None:
    db["samples"].create(
        {
            "id": int, "created": float, "image": bytes, "media_type": str, "sha256": str, "bytes": int,
            "label": int, "pred": int, "klass": int, "confidence": float, "model_version": str,
            "holdout": int, "source": str,
        },
        pk="id",
        not_null={"created", "image", "media_type", "sha256", "bytes", "holdout", "source"},
    )
    db.execute("CREATE UNIQUE INDEX samples_sha256 ON samples(sha256)")
    db.execute("CREATE INDEX samples_klass_id ON samples(klass, id)")


def _migration_2(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE samples ADD COLUMN likelihood BLOB")
    db.execute("ALTER TABLE samples ADD COLUMN raw_pred INTEGER")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1, _migration_2]


def _connect(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a committed row survives a crash and a power cut
    conn.execute("PRAGMA busy_timeout=30000")
    return sqlite_utils.Database(conn)


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the schema to SCHEMA_VERSION, one transaction per step; returns the version."""
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"buffer schema version {version} is newer than this edgetune ({SCHEMA_VERSION})")
    for step in range(version, SCHEMA_VERSION):
        with db.conn:
            db.execute("BEGIN")
            MIGRATIONS[step](db)
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", [str(step + 1)])
    return SCHEMA_VERSION


def is_holdout(sha256: str, fraction: float) -> bool:
    """Deterministic validation split by content hash (duplicates can never straddle the split)."""
    return int(sha256[:8], 16) % 10_000 < int(fraction * 10_000)


class SampleBuffer:
    def __init__(self, path: Path, max_rows: int, max_bytes: int, holdout_fraction: float, background_limit: int = 1024):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.holdout_fraction = holdout_fraction
        # A read-only state directory (e.g. remounted read-only after file system errors) still
        # opens, read-only: inference and status keep working, every write answers BufferReadOnly.
        self.read_only = self.path.exists() and not os.access(self.path.parent, os.W_OK)
        if self.read_only:
            conn = sqlite3.connect(f"file:{self.path}?immutable=1", uri=True, check_same_thread=False)
            self._db = sqlite_utils.Database(conn)
        else:
            self._db = _connect(self.path)
            migrate(self._db)
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[NewSample, Future, bool] | None] = queue.Queue()  # (sample, future, offered)
        self._writer: threading.Thread | None = None
        self.background_limit = background_limit
        self._background = 0  # offered samples not yet committed (or failed)
        self._background_lock = threading.Lock()
        self.evicted = 0

    # ---- writing -------------------------------------------------------------------------
    def start(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="buffer-writer", daemon=True)
        self._writer.start()

    def submit(self, sample: NewSample) -> Future:
        """Queue a sample for the next group commit; the future resolves to a `Stored`."""
        future: Future = Future()
        self._queue.put((sample, future, False))
        return future

    def offer(self, sample: NewSample) -> Future | None:
        """Queue a sample for the next group commit without waiting for it: None (nothing queued)
        when `background_limit` offered samples are still waiting. BufferReadOnly at once when the
        state directory is read-only. The future resolves to a `Stored`, or to the StorageError
        that lost the sample."""
        if self.read_only:
            raise BufferReadOnly(f"state directory {self.path.parent} is read-only, sample not stored")
        with self._background_lock:
            if self._background >= self.background_limit:
                return None
            self._background += 1
        future: Future = Future()
        self._queue.put((sample, future, True))
        return future

    @property
    def queued(self) -> int:
        """Offered samples waiting for a commit."""
        return self._background

    def close(self) -> None:
        """Commits everything queued (offered samples included), then stops the writer."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=30)
            self._writer = None
        self._db.conn.close()

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 512:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                stored = self.add_many([s for s, _, _ in batch])
            except Exception as exc:  # never let the writer thread die
                for _, fut, _ in batch:
                    fut.set_exception(exc)
                self._settled(batch)
                continue
            for (_, fut, _), result in zip(batch, stored):
                fut.set_result(result)
            self._settled(batch)

    def _settled(self, batch: list[tuple[NewSample, Future, bool]]) -> None:
        """Offered samples leave the count once resolved (after their futures' callbacks ran)."""
        offered = sum(o for _, _, o in batch)
        if offered:
            with self._background_lock:
                self._background -= offered

    def add_many(self, samples: list[NewSample]) -> list[Stored]:
        """Insert in one transaction (duplicates by content are not stored twice), then evict."""
        if self.read_only:
            raise BufferReadOnly(f"state directory {self.path.parent} is read-only, sample not stored")
        now = time.time()
        results = []
        try:
            with self._lock:
                conn = self._db.conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for s in samples:
                        digest = hashlib.sha256(s.image).hexdigest()
                        existing = conn.execute("SELECT id FROM samples WHERE sha256 = ?", [digest]).fetchone()
                        if existing:
                            if s.label is not None:
                                conn.execute("UPDATE samples SET label = ?, klass = ? WHERE id = ?", [s.label, s.label, existing[0]])
                            results.append(Stored(existing[0], True))
                            continue
                        klass = s.label if s.label is not None else s.pred
                        cur = conn.execute(
                            "INSERT INTO samples (created, image, media_type, sha256, bytes, label, pred, klass, confidence,"
                            " model_version, holdout, source, likelihood, raw_pred) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            [now, s.image, s.media_type, digest, len(s.image), s.label, s.pred, klass, s.confidence,
                             s.model_version, int(is_holdout(digest, self.holdout_fraction)), s.source, s.likelihood, s.raw_pred],
                        )
                        results.append(Stored(cur.lastrowid, False))
                    self._evict(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # SQLite may already have rolled back (e.g. on SQLITE_FULL)
                        conn.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError) as exc:
            fault = storage_error(exc, "sample not stored")
            if fault is None:
                raise
            raise fault from None
        return results

    def _evict(self, conn: sqlite3.Connection) -> None:
        """Drop the oldest samples of the most common class until within the row and byte bounds."""
        rows, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM samples").fetchone()
        while rows > self.max_rows or size > self.max_bytes:
            klass = conn.execute(
                "SELECT klass FROM samples GROUP BY klass ORDER BY COUNT(*) DESC, MIN(id) ASC LIMIT 1"
            ).fetchone()[0]
            n = max(1, min(64, rows - self.max_rows)) if rows > self.max_rows else 8
            victims = conn.execute(
                "SELECT id, bytes FROM samples WHERE klass IS ? ORDER BY id LIMIT ?", [klass, n]
            ).fetchall()
            conn.execute(f"DELETE FROM samples WHERE id IN ({','.join('?' * len(victims))})", [v[0] for v in victims])
            rows -= len(victims)
            size -= sum(v[1] for v in victims)
            self.evicted += len(victims)

    def set_label(self, sample_id: int, label: int) -> bool:
        """Attach the truth to a buffered sample; False if it is not (or no longer) buffered."""
        if self.read_only:
            raise BufferReadOnly(f"state directory {self.path.parent} is read-only, label not stored")
        try:
            with self._lock, self._db.conn:
                cur = self._db.conn.execute("UPDATE samples SET label = ?, klass = ? WHERE id = ?", [label, label, sample_id])
        except (sqlite3.Error, OSError) as exc:
            fault = storage_error(exc, "label not stored")
            if fault is None:
                raise
            raise fault from None
        return cur.rowcount > 0

    # ---- reading -------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            conn = self._db.conn
            rows, labelled, size, held, last = conn.execute(
                "SELECT COUNT(*), COUNT(label), COALESCE(SUM(bytes), 0), COALESCE(SUM(holdout), 0), COALESCE(MAX(id), 0) FROM samples"
            ).fetchone()
            per_class = dict(conn.execute("SELECT klass, COUNT(*) FROM samples GROUP BY klass").fetchall())
        return {
            "samples": rows, "labelled": labelled, "bytes": size, "held_out": held, "last_id": last,
            "per_class": per_class, "max_rows": self.max_rows, "max_bytes": self.max_bytes, "evicted": self.evicted,
            "queued": self.queued,
        }

    def recent_answers(self, limit: int) -> list[tuple[bytes, int, int | None]]:
        """(likelihood row, uncorrected argmax, label) of the latest `limit` answered samples that have them,
        oldest first: what the class-prior estimate is rebuilt from at start."""
        with self._lock:
            rows = self._db.execute(
                "SELECT likelihood, raw_pred, label FROM samples WHERE likelihood IS NOT NULL AND raw_pred IS NOT NULL"
                " ORDER BY id DESC LIMIT ?", [limit]).fetchall()
        return [(r[0], r[1], r[2]) for r in reversed(rows)]

    def labels_of(self, sample_ids: list[int]) -> dict[int, int]:
        """The labels of those of `sample_ids` that are buffered and labelled."""
        out: dict[int, int] = {}
        with self._lock:
            for start in range(0, len(sample_ids), 500):
                chunk = sample_ids[start:start + 500]
                out.update(self._db.execute(
                    f"SELECT id, label FROM samples WHERE label IS NOT NULL AND id IN ({','.join('?' * len(chunk))})", chunk).fetchall())
        return out

    def image(self, sample_id: int) -> tuple[bytes, str] | None:
        """A buffered sample's image as received and its media type (sniffed where it was sent as octet-stream)."""
        with self._lock:
            row = self._db.execute("SELECT image, media_type FROM samples WHERE id = ?", [sample_id]).fetchone()
        if row is None:
            return None
        data, media = row
        if not media.startswith("image/"):
            media = next((kind for magic, kind in IMAGE_MAGIC if data.startswith(magic)), "application/octet-stream")
        return data, media


IMAGE_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"),
               (b"RIFF", "image/webp"))


def read_snapshot(path: Path, max_id: int, batch: int = 256) -> Iterator[tuple[int, bytes, int | None, int | None, bool]]:
    """Stream (id, image, label, pred, holdout) of rows up to `max_id` through a read-only connection
    (WAL lets this run beside the writer)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        last = 0
        while True:
            rows = conn.execute(
                "SELECT id, image, label, pred, holdout FROM samples WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                [last, max_id, batch],
            ).fetchall()
            if not rows:
                return
            for r in rows:
                yield r[0], r[1], r[2], r[3], bool(r[4])
            last = rows[-1][0]
    finally:
        conn.close()
