"""Per-sample results as JSON lines: append-only, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

KEY_FIELDS = ("kind", "engine", "model", "method", "budget", "protocol", "task", "length", "sample_id")


def record_key(record: dict) -> tuple:
    return tuple(str(record.get(k)) for k in KEY_FIELDS)


class RecordFile:
    """``samples.jsonl`` in a run folder; ``done`` holds the keys already measured."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if path.exists():
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line:
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted write: measured again
        self.done = {record_key(r) for r in self.records}

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.records.append(record)
        self.done.add(record_key(record))
