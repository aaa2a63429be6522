"""rlhf.runlog: a checkpoint is replaced whole, and a crash mid-swap still leaves one to resume from."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.runlog import checkpoint_dir, latest_checkpoint


def write(path: Path, text: str) -> None:
    with checkpoint_dir(path) as tmp:
        (tmp / "state.txt").write_text(text)


def test_checkpoint_is_replaced_whole(tmp_path):
    ckpt = tmp_path / "checkpoint-last"
    write(ckpt, "one")
    write(ckpt, "two")
    assert (ckpt / "state.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last"]  # no .tmp or .old left behind
    assert latest_checkpoint(ckpt) == ckpt


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoint-last"
    write(ckpt, "one")
    with pytest.raises(RuntimeError), checkpoint_dir(ckpt) as tmp:
        (tmp / "state.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert (latest_checkpoint(ckpt) / "state.txt").read_text() == "one"
    write(ckpt, "three")  # the stale .tmp does not get in the way
    assert (ckpt / "state.txt").read_text() == "three"


def test_a_crash_between_the_two_renames_resumes_from_the_old_one(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoint-last"
    write(ckpt, "one")
    rename = Path.rename

    def crash_on_swap_in(self, target):
        if self.name.endswith(".tmp"):
            raise OSError("power cut")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_swap_in)
    with pytest.raises(OSError, match="power cut"):
        write(ckpt, "two")
    monkeypatch.undo()
    assert not ckpt.exists()
    assert latest_checkpoint(ckpt) == tmp_path / "checkpoint-last.old"
    assert (latest_checkpoint(ckpt) / "state.txt").read_text() == "one"
    write(ckpt, "three")  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last"]


def test_device_summary_names_the_device_and_the_cuda_peak_only_on_cuda():
    import types

    import torch

    from rlhf.runlog import device_summary

    cpu = device_summary(types.SimpleNamespace(device=torch.device("cpu"), mixed_precision="no"))
    assert cpu == {"device": "cpu", "mixed_precision": "no", "peak_memory_mib": None}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        x = torch.empty(2**20, dtype=torch.float32, device="cuda")  # 4 MiB
        gpu = device_summary(types.SimpleNamespace(device=x.device, mixed_precision="bf16"))
        assert gpu["device"].startswith("cuda") and gpu["peak_memory_mib"] >= 4.0


def test_clip_gradients_returns_the_norm_and_stops_on_a_nonfinite_one(tmp_path):
    import torch
    from accelerate import Accelerator

    from rlhf.runlog import clip_gradients, save_training_state

    accelerator = Accelerator(cpu=True)
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients(accelerator, [w], 1.0, "test step 1", None) == pytest.approx(5.0)  # the norm before clipping
    assert torch.linalg.vector_norm(w.grad).item() == pytest.approx(1.0)  # and clipped to max_norm
    opt = torch.optim.AdamW([w])
    save_training_state(tmp_path / "checkpoint-last", torch.nn.Module(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), {})
    w.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(RuntimeError, match=r"test step 2: the gradient norm became nan.*unharmed.*checkpoint-last"):
        clip_gradients(accelerator, [w], 1.0, "test step 2", tmp_path / "checkpoint-last")


def test_prefer_safe_attention_turns_cudnn_attention_off_on_cuda_unless_asked(monkeypatch):
    import torch

    from rlhf.runlog import prefer_safe_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setenv("STORYPREF_CUDNN_SDPA", "1")
        prefer_safe_attention()
        assert torch.backends.cuda.cudnn_sdp_enabled()  # the user kept it
        monkeypatch.delenv("STORYPREF_CUDNN_SDPA")
        prefer_safe_attention()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
