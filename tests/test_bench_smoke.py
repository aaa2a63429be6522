"""The PPO storyworld benchmark end to end, in its short --smoke setting (the full one is in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_ppo_storyworld_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "ppo_storyworld.py"), "--smoke", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=880)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("utility_sft", "utility_ppo", "win_rate_vs_sft", "kl_to_sft", "minutes"):
        assert isinstance(report[key], (int, float)), key
    assert 0.0 <= report["win_rate_vs_sft"] <= 1.0
    assert set(report["phases"]) == {"make", "sft", "generate", "annotate", "export", "reward_model", "ppo"}
    assert report["ppo"]["reward"]["reward/human"] == report["ppo"]["reward"]["reward/human"]  # a number, not NaN
    for part in ("sft/metrics.json", "rm/metrics.json", "ppo/metrics.json", "ppo/adapter_model.safetensors", "trl/train.jsonl"):
        assert (tmp_path / part).exists(), part
