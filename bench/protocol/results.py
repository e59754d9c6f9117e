"""results.csv: one row per (network, level, subset, method), appended and flushed row by row so that a
rerun resumes; the methods a row can hold; the configuration an output folder holds results of."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

METHODS = ("none", "ceiling", "agnostic", "adapt", "activation", "apoz", "taylor")
DATA_AWARE = ("adapt", "activation", "apoz", "taylor")
# not a run of its own: per subset, the data-aware run that scores best on the validation split (what a
# device that tries every criterion and keeps the winner would serve; it costs their four cycles)
PICKED = "picked"
PER_SUBSET_ONCE = ("none", "ceiling")  # do not depend on the level: computed once, one row per level
CSV_FIELDS = [
    "network", "level", "subset", "subset_size", "method", "criterion", "finetune_epochs", "retrain_epochs",
    "accuracy", "correct", "test_samples", "train_samples", "params", "macs", "level_achieved", "seconds", "reused",
    "augment", "val_accuracy",
]


def level_key(level: float) -> str:
    return f"{level:.2f}"


class Results:
    """results.csv, appended and flushed row by row; rows already there are skipped on rerun."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, str, str, str], dict] = {}
        if path.is_file():
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    try:
                        float(row["accuracy"])
                        float(row["seconds"])
                    except (TypeError, ValueError, KeyError):
                        continue  # a torn last line from an interrupted run
                    self.rows[self.key(row)] = row
        # rewrite cleanly (drops a torn line), then append
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows.values())
        os.replace(tmp, path)
        self._fh = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, CSV_FIELDS, extrasaction="ignore")

    @staticmethod
    def key(row: dict) -> tuple[str, str, str, str]:
        return (row["network"], row["level"], row["subset"], row["method"])

    def has(self, network: str, level: float, subset: str, method: str) -> bool:
        return (network, level_key(level), subset, method) in self.rows

    def any_level(self, network: str, subset: str, method: str) -> dict | None:
        for (n, _, s, m), row in self.rows.items():
            if (n, s, m) == (network, subset, method):
                return row
        return None

    def add(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in CSV_FIELDS}
        row = {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in row.items()}
        self.rows[self.key(row)] = row
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def check_config(out: Path, config: dict) -> None:
    """An output directory holds the results of one configuration; refuse to mix another into it."""
    path = out / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise SystemExit(
                f"paper_protocol: {out} holds results of another configuration (differs in: {', '.join(diff)}); "
                "use another --out or delete it"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
