"""What every training entry point shares: metrics to JSONL and TensorBoard, and whole-or-nothing checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import os
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


def prefer_safe_attention() -> None:
    """On CUDA, turn off PyTorch's cuDNN attention backend unless STORYPREF_CUDNN_SDPA=1.

    Its backward returns NaN gradients for some masked shapes on Hopper GPUs (H100/H200) with torch
    2.11 and later, while the forward stays finite (pytorch/pytorch#196678, huggingface/trl#7181): a
    bf16 DPO run on a ViT-GPT2 went NaN at its third step on an H200 here, and the same batch is clean
    with another attention backend. Flash and memory-efficient attention take over at about the same speed.
    """
    import torch

    if torch.cuda.is_available() and os.environ.get("STORYPREF_CUDNN_SDPA") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)


def clip_gradients(accelerator, params, max_norm: float, where: str, checkpoint: Path | None) -> float:
    """`accelerator.clip_grad_norm_`, but stop before the optimizer step when the norm is not finite.

    A NaN gradient with a finite loss would write NaN into every trained weight at the next step
    (AdamW spreads it whatever the learning rate), and the run would only fail a step later, with a
    checkpoint that may already hold the damage. Returns the norm before clipping.
    """
    norm = float(accelerator.clip_grad_norm_(params, max_norm))
    if not math.isfinite(norm):
        hint = ("On CUDA, a known cause is the cuDNN attention backward (see docs/training.md, 'NaN on a GPU'); "
                "storypref turns that backend off unless STORYPREF_CUDNN_SDPA=1. ") if accelerator.device.type == "cuda" else ""  # fmt: skip
        raise RuntimeError(f"{where}: the gradient norm became {norm} while the loss was finite; stopped before the update, so the "
                           f"weights are unharmed. {hint}Try without --bf16, or a lower --lr. The last good checkpoint is "
                           f"{latest_checkpoint(checkpoint) if checkpoint is not None and latest_checkpoint(checkpoint).exists() else 'none yet'}.")  # fmt: skip
    return norm


def device_summary(accelerator) -> dict:
    """Where a run ran, for its metrics.json: the device, the mixed precision, and on CUDA the peak memory.

    `peak_memory_mib` is `torch.cuda.max_memory_allocated` of this process's device (the tensors' peak,
    without the allocator's cache), None on the CPU.
    """
    import torch

    device = accelerator.device
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    summary = {"device": str(device), "mixed_precision": str(accelerator.mixed_precision), "peak_memory_mib": peak}
    if device.type == "cuda":
        summary["cudnn_attention"] = torch.backends.cuda.cudnn_sdp_enabled()
    return summary


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
