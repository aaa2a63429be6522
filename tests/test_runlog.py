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
