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


def save_training_state(path: Path, module, optimizer, scheduler, state: dict) -> None:
    """`checkpoint_dir(path)/state.pt`: the trainable weights of `module`, the optimizer, the schedule, torch's RNG and `state`."""
    import torch

    trained = {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
    with checkpoint_dir(path) as tmp:
        torch.save({"trained": trained, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), **state}, tmp / "state.pt")  # fmt: skip


def restore_training_state(path: Path, module, optimizer, scheduler) -> dict:
    """`save_training_state`'s inverse, from the latest whole checkpoint at `path`; returns the saved dict (its `state` keys)."""
    import torch

    found = latest_checkpoint(path)
    if not (found / "state.pt").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {found}; run without --resume first")
    saved = torch.load(found / "state.pt", weights_only=False)
    named = dict(module.named_parameters())
    with torch.no_grad():
        for n, v in saved["trained"].items():
            named[n].copy_(v)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return saved | {"found": found}
