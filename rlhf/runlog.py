"""What every training entry point shares: metrics to JSONL and TensorBoard, and whole-or-nothing checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path


def log_metrics(writer, jsonl: Path, step: int, metrics: dict) -> None:
    """One `{"step": …, **metrics}` line in `jsonl`, and each finite number as a TensorBoard scalar."""
    with jsonl.open("a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if writer is not None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                writer.add_scalar(k, v, step)


@contextlib.contextmanager
def checkpoint_dir(path: Path) -> Iterator[Path]:
    """Write a checkpoint into a temporary sibling, then swap it in: it appears whole, or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
