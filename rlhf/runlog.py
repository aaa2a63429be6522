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
    """Write a checkpoint into a temporary sibling, then swap it in: it appears whole, or not at all.

    The swap is two renames (the old checkpoint aside to `<path>.old`, the new one in), so at every
    instant one whole checkpoint exists under `path` or `<path>.old`; `latest_checkpoint` finds it.
    """
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def latest_checkpoint(path: Path) -> Path:
    """`path`, or `<path>.old` when a crash came between `checkpoint_dir`'s two renames."""
    old = path.with_name(path.name + ".old")
    return old if not path.exists() and old.exists() else path
