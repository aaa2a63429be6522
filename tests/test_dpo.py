"""rlhf.dpo on a tiny ViT-GPT2 and a tiny world's pairs: what trains, the first loss, resume, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from annotate.formats import format_prompt
from rlhf.data import DataError
from rlhf.dpo import DPOConfig, parse_args, train
from rlhf.policy import UnsupportedPolicyError, load_policy
from storyworld.world import make_world
from tests.fixtures import make_tiny

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def trl_rows(world: Path, tie_every: int = 0) -> list[dict]:
    """One TRL row per item: its best candidate by the hidden utility against its worst (or a tie)."""
    rows = []
    for n, line in enumerate((world / "world.jsonl").open()):
        item = json.loads(line)
        ranked = sorted(item["candidates"], key=lambda c: -c["utility"])
        rows.append({"prompt": format_prompt(item["instruction"], item["style"], item["context"]), "chosen": ranked[0]["text"],
                     "rejected": ranked[-1]["text"], "images": [str(world / p) for p in item["image_paths"]], "item_id": item["external_id"],
                     "tie": bool(tie_every and n % tie_every == 0)})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    world = make_world(root / "world", 24, seed=7, frames=(1, 2), image_size=(32, 32))
    torch.manual_seed(0)
    make_tiny.tiny_vit_gpt2(root / "policy")
    rows = trl_rows(world, tie_every=5)
    (root / "trl").mkdir()
    (root / "trl" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (root / "trl" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    return root


def config(root: Path, out: str, **kw) -> DPOConfig:
    base = dict(policy=str(root / "policy"), data=str(root / "trl"), output_dir=str(root / out), batch_size=4, epochs=1, lr=5e-3,
                max_length=48, logging_steps=1, save_steps=100, warmup_ratio=0.0, device="cpu")  # fmt: skip
    return DPOConfig(**{**base, **kw})


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_trains_the_adapter_only_and_starts_at_ln2(setup, loss_type):
    root = setup
    base = {k: v.clone() for k, v in load_policy(str(root / "policy")).model.state_dict().items()}
    out = f"run-{loss_type}"
    policy, result = train(config(root, out, loss_type=loss_type, beta=0.5 if loss_type == "ipo" else 0.1))
    rows = [json.loads(x) for x in (root / out / "metrics.jsonl").open()]
    first = rows[0]
    # A fresh adapter is the reference: every log-ratio is 0, so the sigmoid loss is ln 2 (ties too), and
    # IPO's is the mean squared target gap, (1/(2β))² = 1 for decisive pairs and 0 for ties.
    ties = sum(json.loads(x)["tie"] for x in (root / "trl" / "train.jsonl").open())
    assert ties > 0
    if loss_type == "sigmoid":
        assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert first["dpo/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert 0.0 < first["dpo/loss"] <= 1.0 + 1e-5
    assert result["steps"] == 5 and result["train_pairs"] == 20 and result["eval_pairs"] == 4
    assert result["device"] == "cpu" and result["mixed_precision"] == "no" and result["peak_memory_mib"] is None
    for key in ("eval_loss", "eval_rewards_accuracies", "eval_rewards_margins", "eval_rewards_chosen", "eval_rewards_rejected"):
        assert key in result and math.isfinite(result[key]), key
    assert [r["step"] for r in rows if "dpo/loss" in r] == [1, 2, 3, 4, 5]
    state = policy.model.state_dict()
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k), "the LoRA adapter trained"
    for k, v in state.items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base[k.replace("base_model.model.", "").replace(".base_layer", "")], msg=k)
    again = load_policy(str(root / out))  # the saved adapter loads as a policy (rlhf.generate, rlhf.ppo)
    assert again.adapter_hash() == policy.adapter_hash()
    assert (root / out / "tb").is_dir() and (root / out / "checkpoint-last" / "state.pt").exists()


def test_dpo_moves_the_implicit_reward_toward_the_chosen_story(setup):
    root = setup
    _, result = train(config(root, "learn", epochs=6, beta=0.5))
    rows = [json.loads(x) for x in (root / "learn" / "metrics.jsonl").open() if "dpo/loss" in x]
    assert rows[-1]["dpo/loss"] < rows[0]["dpo/loss"] - 0.05
    assert rows[-1]["dpo/rewards/margins"] > 0


def test_resume_continues_exactly(setup):
    from accelerate.state import AcceleratorState

    root = setup
    straight, _ = train(config(root, "straight", epochs=2))
    AcceleratorState._reset_state(True)
    train(config(root, "split", epochs=2, stop_after=3))
    AcceleratorState._reset_state(True)
    resumed, result = train(config(root, "split", epochs=2, resume=True))
    assert result["steps"] == 10
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, straight.model.state_dict()[k], msg=k)
    a = [json.loads(x) for x in (root / "straight" / "metrics.jsonl").open() if "dpo/loss" in x]
    b = [json.loads(x) for x in (root / "split" / "metrics.jsonl").open() if "dpo/loss" in x]
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["dpo/loss"] for r in b] == pytest.approx([r["dpo/loss"] for r in a], abs=1e-6)


def test_bad_input_is_refused_before_any_compute(setup, tmp_path):
    root = setup
    ties = [r | {"tie": True} for r in trl_rows(root / "world")]
    (tmp_path / "ties.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ties))
    # The data is checked before the policy is loaded: a policy that does not exist is never reached.
    with pytest.raises(DataError, match=r"ties.jsonl: all \d+ pairs are ties"):
        train(config(root, "bad", data=str(tmp_path / "ties.jsonl"), policy=str(tmp_path / "nowhere")))
    no_images = trl_rows(root / "world")
    no_images[3]["images"] = []
    (tmp_path / "no-images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_images))
    with pytest.raises(DataError, match=r"no-images.jsonl:4: the pair has no images"):
        train(config(root, "bad", data=str(tmp_path / "no-images.jsonl"), policy=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="--data is required"):
        train(config(root, "bad", data=""))
    with pytest.raises(ValueError, match="--loss_type 'hinge': use sigmoid or ipo"):
        train(config(root, "bad", loss_type="hinge"))
    with pytest.raises(ValueError, match=r"--label_smoothing 0.5: use a value in \[0, 0.5\)"):
        train(config(root, "bad", label_smoothing=0.5))
    with pytest.raises(DataError, match="fewer than one update"):
        train(config(root, "bad", batch_size=64))
    make_tiny.tiny_text_encoder(tmp_path / "bert")
    with pytest.raises(UnsupportedPolicyError, match="'bert' model"):
        train(config(root, "bad", policy=str(tmp_path / "bert")))
    assert not (root / "bad").exists(), "nothing was written"


def test_the_command_line_reads_flags_and_yaml(setup, tmp_path):
    root = setup
    (tmp_path / "dpo.yaml").write_text(f"policy: {root / 'policy'}\ndata: {root / 'trl'}\nloss_type: ipo\nbeta: 0.5\nlabel_smoothing: 0.0\n")
    cfg = parse_args(["--config", str(tmp_path / "dpo.yaml"), "--skip_ties", "--lr", "1e-4"])
    assert (cfg.loss_type, cfg.beta, cfg.skip_ties, cfg.lr) == ("ipo", 0.5, True, 1e-4)
    done = subprocess.run([sys.executable, "-m", "rlhf.dpo", "--policy", str(root / "policy"), "--data", str(tmp_path / "none.jsonl")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "none.jsonl" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(600)
def test_two_processes_with_accelerate(setup):
    import os

    root = setup
    out = root / "ddp"
    cfg = {"policy": str(root / "policy"), "data": str(root / "trl"), "output_dir": str(out), "batch_size": 2, "max_length": 24, "logging_steps": 1}
    (root / "dpo.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf.dpo", "--config", str(root / "dpo.yaml")]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 20 // 2 // 2  # each process takes half the pairs
    assert load_policy(str(out)).has_adapter


def test_span_weights_reweigh_exactly_the_marked_tokens(setup):
    """--span_weight γ: the rejected story's marked tokens count γ times in its log-ratio, the chosen
    story's marked tokens 0 times, everything else once; checked against the per-token log-probs."""
    import re

    from annotate.formats import parse_prompt, plain_spans, plain_text
    from rlhf.data import load_preferences
    from rlhf.dpo import sequence_logprobs, span_token_weights

    root = setup
    policy = load_policy(str(root / "policy"))
    pair = load_preferences(root / "trl")[0][1]
    words = [m for m in re.finditer(r"[A-Za-z]+", re.sub(r"<[^>]*>", lambda m: " " * len(m.group()), pair.rejected))]
    third, first_c = words[2], re.search(r"[A-Za-z]+", re.sub(r"<[^>]*>", lambda m: " " * len(m.group()), pair.chosen))
    pair.spans = {"rejected": [{"start": third.start(), "end": third.end(), "label": "hallucinated"}],
                  "chosen": [{"start": first_c.start(), "end": first_c.end(), "label": "other"}]}  # fmt: skip
    texts = [plain_text(pair.chosen), plain_text(pair.rejected)]
    ids, mask = policy.tokenize_responses(texts)
    ids, mask = ids[:, :48], mask[:, :48]
    weights = span_token_weights(policy, [pair], ids.shape[1], 5.0)
    offsets = policy.response_offsets(texts)
    (at, end), = plain_spans(pair.rejected, pair.spans["rejected"])
    assert texts[1][at:end] == third.group()
    marked_r = [t for t, (a, b) in enumerate(offsets[1][:48]) if b > a and a < end and at < b]
    assert marked_r and all(weights[1, t] == 5.0 for t in marked_r) and weights[1].tolist().count(5.0) == len(marked_r)
    assert third.group() in policy.tokenizer.decode(ids[1, marked_r].tolist())
    zeroed = [t for t in range(ids.shape[1]) if weights[0, t] == 0]
    assert zeroed and policy.tokenizer.decode(ids[0, zeroed].tolist()).strip() == first_c.group()
    assert (weights == 1).sum() == weights.numel() - len(marked_r) - len(zeroed)  # every other token (and the EOS) weighs 1
    # The weighted sums are the per-token log-probs times these weights.
    with torch.no_grad():
        plain_c, plain_r, _, _ = sequence_logprobs(policy, policy, [pair], 48)
        weighted_c, weighted_r, _, _ = sequence_logprobs(policy, policy, [pair], 48, span_weight=5.0)
        instruction, style, context = parse_prompt(pair.prompt)
        batch = policy.batch([[r.load() for r in pair.images]] * 2, [instruction] * 2, [style] * 2, [context] * 2)
        per_token = policy(batch, ids, mask).logprobs
    assert torch.allclose(torch.cat([plain_c, plain_r]), per_token.sum(1), atol=1e-5)
    assert torch.allclose(torch.cat([weighted_c, weighted_r]), (per_token * weights).sum(1), atol=1e-5)
    assert not torch.allclose(weighted_r, plain_r)


def test_segment_dpo_trains_and_needs_marks(setup, tmp_path):
    root = setup
    rows = [json.loads(x) for x in (root / "trl" / "train.jsonl").open()]
    for r in rows:  # mark the rejected story's first word in every pair
        r["spans"] = {"chosen": [], "rejected": [{"start": 0, "end": len(r["rejected"].split()[0]), "label": "hallucinated"}]}
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "marked" / "test.jsonl").write_text((root / "trl" / "test.jsonl").read_text())
    _, result = train(config(root, "segment", data=str(tmp_path / "marked"), span_weight=5.0, epochs=2))
    assert math.isfinite(result["eval_loss"])
    with pytest.raises(DataError, match="needs span marks, and no train pair has any"):
        train(config(root, "nomarks", span_weight=5.0))
    with pytest.raises(ValueError, match="--span_weight -1"):
        train(config(root, "neg", span_weight=-1.0))


def test_contrast_pairs_join_the_training_pairs_only(setup, tmp_path):
    """--contrast_words: each decisive train pair's chosen story, with one look swapped, becomes a new rejected story
    (train only; the held-out figures stay the annotators' pairs). Words that match no story are refused before compute."""
    root = setup
    (tmp_path / "words.txt").write_text("red, blue, green, yellow, purple, orange, pink, black\ncircle, square, triangle, star, diamond\n")
    _, result = train(config(root, "contrast", contrast_words=str(tmp_path / "words.txt"), contrast_share=1.0))
    decisive = sum(not json.loads(x)["tie"] for x in (root / "trl" / "train.jsonl").open())
    assert 0 < result["contrast_pairs"] <= decisive
    assert result["train_pairs"] == 20 + result["contrast_pairs"]
    assert result["eval_pairs"] == sum(1 for _ in (root / "trl" / "test.jsonl").open())  # no contrast pair is held out
    assert result["steps"] == result["train_pairs"] // 4
    (tmp_path / "none.txt").write_text("zebra, giraffe\n")
    with pytest.raises(DataError, match=r"none.txt: no chosen story in .* holds a phrase of these groups"):
        train(config(root, "bad", contrast_words=str(tmp_path / "none.txt"), policy=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"--contrast_share 0.0: use a value in \(0, 1\]"):
        train(config(root, "bad", contrast_words=str(tmp_path / "words.txt"), contrast_share=0.0))
    assert not (root / "bad").exists()
