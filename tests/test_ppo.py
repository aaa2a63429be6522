"""rlhf.ppo and rlhf.rewards on tiny models: what trains, KL at the start, resume, bad input, 2 processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from annotate.formats import format_prompt, parse_prompt
from rlhf.data import ImageRef
from rlhf.loading import ModelLoadError
from rlhf.policy import UnsupportedPolicyError, load_policy
from rlhf.ppo import PPOConfig, train
from rlhf.reward_model import RewardModel, RewardModelConfig
from rlhf.rewards import (
    CheckConfig,
    CoherenceReward,
    CompositeReward,
    RunningStats,
    StyleReward,
    bag_of_words_scorer,
    baseline_agreement,
    check,
    ends_a_sentence,
    parse_weights,
    signal_agreement,
    wilson_interval,
)
from rlhf.stories import StoryDataError
from storyworld.world import make_world
from tests.fixtures import make_tiny

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny world, a tiny ViT-GPT2 policy, a tiny reward model, a tiny CLIP."""
    root = tmp_path_factory.mktemp("ppo")
    world = make_world(root / "world", 12, seed=5, frames=(1, 2), image_size=(32, 32))
    torch.manual_seed(0)
    make_tiny.tiny_vit_gpt2(root / "policy")
    make_tiny.tiny_text_encoder(root / "enc")
    make_tiny.tiny_clip(root / "clip")
    rm = RewardModel.build(RewardModelConfig(text_model=str(root / "enc"), clip_model=str(root / "clip"), clip_pretrained=None))
    with torch.no_grad():  # a reward model with opinions: a random head
        for p in rm.module.head.parameters():
            p.normal_(0, 0.5)
    rm.save_pretrained(root / "rm")
    return root, world


def config(root: Path, world: Path, out: str, **kw) -> PPOConfig:
    base = dict(policy=str(root / "policy"), prompts=str(world / "items.jsonl"), output_dir=str(root / out),
                reward_model=str(root / "rm"), reward_weights="human=1,repetition=0.5,clip=0.3", clip_model=str(root / "clip"),
                clip_pretrained=None, sentence_model=None, iterations=3, rollout_batch_size=4, mini_batch_size=2, ppo_epochs=2,
                max_new_tokens=8, value_warmup_steps=1, lr=1e-2, cache_dir=str(root / "cache"), save_every=100, sample_every=1)  # fmt: skip
    return PPOConfig(**{**base, **kw})


def test_ppo_trains_lora_and_value_head_only_and_kl_starts_at_zero(setup):
    root, world = setup
    base = {k: v.clone() for k, v in load_policy(str(root / "policy")).model.state_dict().items()}
    policy, result = train(config(root, world, "run", unfinished_penalty=0.5, gradient_checkpointing=True))
    rows = [json.loads(x) for x in (root / "run" / "metrics.jsonl").open()]
    for r in rows:  # the score less the penalties for a missing EOS (1.0) and for an unfinished last sentence (0.5)
        assert r["reward/total"] == pytest.approx(r["reward/score"] - 1.0 * r["reward/missing_eos"] - 0.5 * r["reward/unfinished"], abs=1e-5)
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is the reference
    assert rows[0]["ppo/value_warmup"] == 1.0 and rows[1]["ppo/value_warmup"] == 0.0
    assert [r["ppo/lr"] for r in rows] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])  # linear to 0 over 3 iterations
    for key in ("ppo/kl", "ppo/kl_coef", "ppo/approx_kl", "ppo/clipfrac", "ppo/entropy", "ppo/value_loss", "ppo/explained_variance",
                "reward/human", "reward/clip", "reward/repetition", "reward/total", "response/length", "time/generate_s", "time/score_s",
                "time/kl_gae_s", "time/update_s", "time/score_human_s", "time/score_clip_s", "time/score_repetition_s"):  # fmt: skip
        assert all(key in r for r in rows), key
    for r in rows:  # where the time goes: the signals are timed inside the scoring phase
        assert r["time/update_s"] > 0 and 0 < r["time/score_human_s"] + r["time/score_clip_s"] + r["time/score_repetition_s"] <= r["time/score_s"]
    state = policy.model.state_dict()
    lora = [k for k in state if "lora_B" in k]
    assert lora and any(state[k].abs().sum() > 0 for k in lora), "the LoRA adapter trained"
    for k, v in state.items():
        if "lora_" not in k:
            name = k.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(v, base[name], msg=k)  # the base weights did not move
    head = torch.load(root / "run" / "value_head.pt")
    assert head["linear.weight"].abs().sum() > 0, "the value head trained (it starts at zero)"
    assert (root / "run" / "samples.jsonl").exists() and result["iterations"] == 3
    assert (result["peak_memory_mib"] is None) == (not result["device"].startswith("cuda"))  # metrics.json says where it ran
    again = load_policy(str(root / "run"))  # the saved adapter loads as a policy
    assert again.has_adapter and again.adapter_hash() == policy.adapter_hash()


def test_resume_continues_exactly(setup):
    root, world = setup
    straight, _ = train(config(root, world, "straight", iterations=4))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    train(config(root, world, "split", iterations=4, stop_after=2))
    AcceleratorState._reset_state(True)
    resumed, _ = train(config(root, world, "split", iterations=4, resume=True))
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, straight.model.state_dict()[k], msg=k)
    a = [json.loads(x) for x in (root / "straight" / "metrics.jsonl").open()]
    b = [json.loads(x) for x in (root / "split" / "metrics.jsonl").open()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["reward/total"] for r in b] == pytest.approx([r["reward/total"] for r in a], abs=1e-5)
    assert [r["ppo/lr"] for r in b] == pytest.approx([r["ppo/lr"] for r in a])  # the schedule resumed where it stopped


def test_a_reward_of_ones_own_signals_replaces_the_flags(setup):
    root, world = setup
    calls = []

    def words(images, instructions, contexts, styles, stories):
        calls.append((images, stories))
        return torch.tensor([float(len(s.split())) for s in stories])

    reward = CompositeReward({"words": 1.0}, {"words": words})
    _, result = train(config(root, world, "own", iterations=2, reward_model=None, clip_model=None, reward_weights="humour=1"), reward=reward)
    assert len(calls) == 2 and all(len(i) == len(s) == 4 for i, s in calls)  # one call per rollout of 4
    assert all(Path(str(p)).exists() for i, _ in calls for frames in i for p in frames)  # the prompts' frames
    rows = [json.loads(x) for x in (root / "own" / "metrics.jsonl").open()]
    assert [r["reward/words"] for r in rows] == pytest.approx([sum(len(s.split()) for s in c[1]) / 4 for c in calls])
    assert "reward/human" not in result


def test_length_debias_takes_the_length_slope_out_of_the_scores_the_update_sees(setup, monkeypatch):
    import rlhf.losses

    root, world = setup
    real, calls = rlhf.losses.length_debiased, []

    def spy(scores, lengths, strength=1.0):
        # The tiny policy rarely ends a story within 8 tokens, so every length is 8 and nothing would be taken
        # out: the spy debiases against lengths that vary, to see that what it returns is what PPO trains on.
        varied = lengths + torch.arange(len(lengths), device=lengths.device)
        out, slope = real(scores, varied, strength)
        calls.append((scores.clone(), lengths.clone(), strength, out.clone(), slope.item()))
        return out, slope

    monkeypatch.setattr(rlhf.losses, "length_debiased", spy)

    def words(images, instructions, contexts, styles, stories):
        return torch.tensor([float(len(s.split())) for s in stories])

    reward = CompositeReward({"words": 1.0}, {"words": words})
    train(config(root, world, "debias", iterations=2, length_debias=1.0, missing_eos_penalty=0.0, reward_model=None, clip_model=None), reward=reward)
    assert len(calls) == 2 and all(c[2] == 1.0 and c[1].shape == (4,) and 1 <= c[1].min() <= c[1].max() <= 8 for c in calls)  # tokens per story
    assert any(not torch.allclose(c[0], c[3]) for c in calls)
    rows = [json.loads(x) for x in (root / "debias" / "metrics.jsonl").open()]
    assert [r["reward/length_slope"] for r in rows] == pytest.approx([c[4] for c in calls], abs=1e-6)
    samples = [json.loads(x) for x in (root / "debias" / "samples.jsonl").open()]
    for table, (_, _, _, out, _) in zip(samples, calls):  # the scores PPO trains on are the debiased ones
        assert [r["reward"] for r in table["samples"]] == pytest.approx([round(v, 3) for v in out.tolist()], abs=1e-3)


@pytest.mark.parametrize("advantage,kl_in", [("grpo", "loss"), ("rloo", "reward")])
def test_critic_free_advantages_train_lora_without_a_value_head(setup, advantage, kl_in):
    root, world = setup
    base = {k: v.clone() for k, v in load_policy(str(root / "policy")).model.state_dict().items()}
    calls = []

    def words(images, instructions, contexts, styles, stories):
        calls.append([tuple(map(str, i)) for i in images])
        return torch.tensor([float(len(s.split())) for s in stories])

    reward = CompositeReward({"words": 1.0}, {"words": words})
    out = f"{advantage}-{kl_in}"
    policy, result = train(config(root, world, out, advantage=advantage, kl_in=kl_in, samples_per_prompt=2, iterations=3, reward_model=None,
                                  clip_model=None, kl_coef=0.1), reward=reward)  # fmt: skip
    for images in calls:  # each prompt's two samples side by side
        assert images[0] == images[1] and images[2] == images[3]
    rows = [json.loads(x) for x in (root / out / "metrics.jsonl").open()]
    assert rows[0]["ppo/value_warmup"] == 0.0, "no value head to warm up: the policy trains from the first iteration"
    assert all("ppo/value_loss" not in r and "ppo/explained_variance" not in r for r in rows)
    assert all(("ppo/kl_loss" in r) == (kl_in == "loss") for r in rows)
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert not (root / out / "value_head.pt").exists()
    state = policy.model.state_dict()
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k), "the LoRA adapter trained"
    for k, v in state.items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base[k.replace("base_model.model.", "").replace(".base_layer", "")], msg=k)
    assert result["iterations"] == 3


def test_grpo_resumes_exactly(setup):
    from accelerate.state import AcceleratorState

    root, world = setup
    kw = dict(advantage="grpo", samples_per_prompt=2, kl_in="loss", iterations=4, reward_weights="repetition=1", reward_model=None, clip_model=None)
    straight, _ = train(config(root, world, "grpo-straight", **kw))
    AcceleratorState._reset_state(True)
    train(config(root, world, "grpo-split", stop_after=2, **kw))
    AcceleratorState._reset_state(True)
    resumed, _ = train(config(root, world, "grpo-split", resume=True, **kw))
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, straight.model.state_dict()[k], msg=k)


def test_bad_input_is_refused_before_any_compute(setup, tmp_path):
    root, world = setup
    with pytest.raises(ValueError, match=r"--reward_weights names unknown signal\(s\) \['humour'\]"):
        train(config(root, world, "bad", reward_weights="human=1,humour=2"))
    with pytest.raises(ValueError, match="--lr_scheduler_type 'warmup': use linear, cosine or constant"):
        train(config(root, world, "bad", lr_scheduler_type="warmup"))
    with pytest.raises(ValueError, match="--advantage grpo compares several stories of the same prompt: set --samples_per_prompt to 2"):
        train(config(root, world, "bad", advantage="grpo"))
    with pytest.raises(ValueError, match=r"--length_debias 1.5: give a share in \[0, 1\]"):
        train(config(root, world, "bad", length_debias=1.5))
    with pytest.raises(ValueError, match="--advantage 'dpo': use gae, grpo or rloo"):
        train(config(root, world, "bad", advantage="dpo"))
    with pytest.raises(ValueError, match="--samples_per_prompt 3: give 1 or more, dividing --rollout_batch_size 4"):
        train(config(root, world, "bad", advantage="rloo", samples_per_prompt=3))
    lines = (world / "items.jsonl").read_text().splitlines()
    broken = json.loads(lines[0]) | {"image_paths": ["images/missing.png"]}
    (tmp_path / "images").symlink_to(world / "images")
    (tmp_path / "items.jsonl").write_text(lines[1] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(StoryDataError, match=r"items.jsonl:2: image 'images/missing.png' not found"):
        train(config(root, world, "bad", prompts=str(tmp_path / "items.jsonl")))
    make_tiny.tiny_text_encoder(tmp_path / "bert")
    with pytest.raises(UnsupportedPolicyError, match="'bert' model"):
        train(config(root, world, "bad", policy=str(tmp_path / "bert")))
    # A reward model whose weights come from another backbone than its config names.
    make_tiny.tiny_text_encoder(tmp_path / "enc-other")
    other = json.loads((root / "rm" / "reward_config.json").read_text())
    wider = RewardModelConfig(**{**other, "text_model": str(root / "enc"), "hidden_size": 64})
    RewardModel.build(wider).save_pretrained(tmp_path / "rm-other")
    cfg_file = tmp_path / "rm-other" / "reward_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "hidden_size": other["hidden_size"]}))
    with pytest.raises(ModelLoadError, match="trained on another backbone"):
        train(config(root, world, "bad", reward_model=str(tmp_path / "rm-other")))
    assert not (root / "bad").exists(), "nothing was written"


def test_parse_weights_and_composite_normalization():
    assert parse_weights("human=1, clip=0.3,repetition") == {"human": 1.0, "clip": 0.3, "repetition": 1.0}
    with pytest.raises(ValueError, match="not name=number"):
        parse_weights("human=lots")
    signals = {"a": lambda *args: torch.tensor([1.0, 3.0]), "b": lambda *args: torch.tensor([100.0, 100.0])}
    total, parts = CompositeReward({"a": 2.0, "b": 1.0}, signals)(None, None, None, None, ["x", "y"])
    # a: mean 2, std 1 → (−1, 1) · 2; b: constant, std 0 → 0 (its scale does not leak in)
    assert total.tolist() == pytest.approx([-2.0, 2.0])
    assert parts["b"].tolist() == [100.0, 100.0]


class FakeEncoder:
    """Unit vectors by hand, and a record of each call (the signals embed a whole batch in one)."""

    VECTORS = {"A.": (1.0, 0.0), "B.": (0.0, 1.0), "C.": (0.6, 0.8), "Before.": (0.8, 0.6), "a funny story": (0.0, 1.0)}

    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.tensor([self.VECTORS[t] for t in texts])


def test_coherence_and_style_by_hand():
    encoder = FakeEncoder()
    coherence = CoherenceReward(encoder)
    got = coherence(None, None, ["Before.", "", "Before.", "Before."], None, ["A. B. C.", "C.", "A. C.", ""])
    # consecutive sentences, then the context against the first sentence:
    # (A·B + B·C + ctx·A) / 3 = (0 + 0.8 + 0.8) / 3; one sentence and no context: 0; (A·C + ctx·A) / 2; no story: 0
    assert got.tolist() == pytest.approx([1.6 / 3, 0.0, 0.7, 0.0])
    assert len(encoder.calls) == 1 and sorted(encoder.calls[0]) == ["A.", "B.", "Before.", "C."]  # each text once
    encoder.calls.clear()
    style = StyleReward(encoder, {"calm": "A."})
    got = style(None, None, None, ["calm", "funny", None, "calm"], ["C.", "B.", "A.", ""])
    # the description's vector against the story's: A·C; "a funny story"·B (no description given); no style, no story: 0
    assert got.tolist() == pytest.approx([0.6, 1.0, 0.0, 0.0])
    assert len(encoder.calls) == 1


def test_ends_a_sentence():
    assert ends_a_sentence("Pip the red circle rolled home.") and ends_a_sentence("Who goes there?") and ends_a_sentence("Run!")
    assert ends_a_sentence('Pip said "goodbye."') and ends_a_sentence("<gdo char1>Pip</gdo> slept .  ") and ends_a_sentence("(the end.)")
    assert not ends_a_sentence("On a daring quest, one sunny day in the meadow,")
    assert not ends_a_sentence("Then night fell, and") and not ends_a_sentence("") and not ends_a_sentence('"Hello')


def test_parse_prompt_inverts_format_prompt():
    for args in [("Tell a story.", "spooky", "A cat left home."), ("Tell a story.", None, None), ("Two\nlines.", "funny", None),
                 ("Tell a story.", None, "Pip set off."), ("Tell a story.", "sad", "Pip set off.\nStyle: none of it went well.")]:  # fmt: skip
        assert parse_prompt(format_prompt(*args)) == args


def test_wilson_interval_by_hand():
    # 7 of 10, z = 1.96: centre (0.7 + 0.19208) / 1.38416 = 0.64449, half-width 1.96·√(0.021 + 0.009604) / 1.38416 = 0.24772
    assert wilson_interval(7, 10) == pytest.approx((0.39677, 0.89221), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0) and wilson_interval(10, 10)[1] == 1.0


def test_signal_agreement_by_hand():
    """Each signal's share of decided pairs where it scores the chosen story above the rejected one; ties skipped, equal scores half."""
    seen = []

    def length(images, instructions, contexts, styles, stories):
        seen.append((instructions, contexts, styles))
        return torch.tensor([float(len(s)) for s in stories])

    reward = CompositeReward({"long": 1.0, "short": 1.0, "flat": 1.0},
                             {"long": length, "short": lambda *a: -length(*a), "flat": lambda *a: torch.zeros(len(a[-1]))})  # fmt: skip

    def pair(chosen, rejected, tie=False):
        return SimpleNamespace(prompt=format_prompt("Tell a story.", "funny", "Pip set off."), images=[], chosen=chosen, rejected=rejected,
                               tie=tie)  # fmt: skip

    pairs = [pair("a long one", "short"), pair("longer still", "tiny"), pair("x", "much longer"), pair("same", "same", tie=True)]
    result = signal_agreement(reward, pairs)
    assert {k: result[k] for k in ("long", "short", "flat", "pairs")} == {"long": round(2 / 3, 3), "short": round(1 / 3, 3), "flat": 0.5, "pairs": 3}
    assert result["interval"]["long"] == pytest.approx(wilson_interval(2, 3), abs=1e-3)
    assert seen[0] == (["Tell a story."] * 6, ["Pip set off."] * 6, ["funny"] * 6)  # the prompt, taken apart again; 3 pairs in one batch
    seen.clear()
    assert signal_agreement(reward, pairs, batch_size=2) == result and [len(i) for i, _, _ in seen] == [4, 4, 2, 2]  # batches of 2 and 1
    assert signal_agreement(reward, pairs[-1:]) == {"pairs": 0}  # ties only: nothing to agree with
    seen_images = []
    reward = CompositeReward({"any": 1.0}, {"any": lambda images, *rest: seen_images.append(images) or torch.zeros(len(images))})
    framed = pair("a", "b")
    framed.images = [ImageRef("frames/one.png"), ImageRef("frames/two.png")]
    signal_agreement(reward, [framed])
    assert seen_images == [[[Path("frames/one.png"), Path("frames/two.png")]] * 2]  # frames by path, not decoded: the CLIP cache keys on the file


def test_signal_agreement_of_a_mix_by_hand():
    """--mix: Σ w_k r_k / std_k, each std over every story scored (population std), ranked as a signal is."""
    table = {"a": {"c1": 2, "r1": 0, "c2": 0, "r2": 1, "c3": 0, "r3": 1}, "b": {"c1": 0, "r1": 0, "c2": 3, "r2": 0, "c3": 0, "r3": 3}}
    signals = {k: (lambda *args, k=k: torch.tensor([float(table[k][s]) for s in args[-1]])) for k in table}
    reward = CompositeReward({"a": 1.0, "b": 1.0}, signals)
    pairs = [SimpleNamespace(prompt=format_prompt("Tell a story.", None, None), images=[], chosen=f"c{i}", rejected=f"r{i}", tie=False) for i in (1, 2, 3)]
    # a: 2,0,0 | 0,1,1: std √(10/18) = 0.7454; b: 0,3,0 | 0,0,3: std √2 = 1.4142.
    # Pair 1: 2/0.7454 > 0. Pair 2: −1/0.7454 + w·3/1.4142 = −1.342 + 2.121 w. Pair 3: −1.342 − 2.121 w.
    result = signal_agreement(reward, pairs, mix={"a": 1.0, "b": 1.0})
    assert (result["a"], result["b"], result["mix"]) == (round(1 / 3, 3), 0.5, round(2 / 3, 3))  # b ties pair 1: half
    assert result["interval"]["mix"] == pytest.approx(wilson_interval(2, 3), abs=1e-3)
    assert signal_agreement(reward, pairs, mix={"a": 1.0, "b": 0.5})["mix"] == round(1 / 3, 3)  # pair 2 now −0.281: lost
    assert signal_agreement(reward, pairs, mix={"b": 1.0})["mix"] == 0.5  # one signal alone: its own ordering
    assert "mix" not in signal_agreement(reward, pairs)
    with pytest.raises(ValueError, match=r"the mix names \['clip'\], which are not among the signals scored"):
        signal_agreement(reward, pairs, mix={"clip": 1.0})


def test_bag_of_words_baseline_by_hand():
    """The yardstick: a symmetric logistic regression on count differences, scored as a signal is."""
    from sklearn.linear_model import LogisticRegression

    def pair(chosen, rejected, tie=False):
        return SimpleNamespace(chosen=chosen, rejected=rejected, tie=tie)

    train = [pair("a calm cat", "a bad cat"), pair("calm dog sat", "bad dog sat"), pair("one calm day", "one bad day"),
             pair("bad", "bad", tie=True)]  # fmt: skip
    score = bag_of_words_scorer(train, c=1.0, ngrams=1)
    # Vocabulary (fit on 6 stories, min_df 1): a bad calm cat day dog one sat; every difference is calm − bad, so
    # the fit is 1-D: w_calm = −w_bad = w, where w maximizes Σ log σ(2w) − w²/(2C)·2 ... compare with sklearn itself.
    import numpy as np

    x = np.zeros((6, 8))
    x[:3, 2], x[:3, 1] = 1, -1  # calm − bad, three times
    x[3:] = -x[:3]
    w = LogisticRegression(C=1.0, fit_intercept=False, max_iter=5000).fit(x, [1, 1, 1, 0, 0, 0]).coef_.ravel()
    assert w[2] > 0 and w[1] == pytest.approx(-w[2])
    assert score(["calm", "bad", "cat"]) == pytest.approx([w[2], w[1], 0.0], abs=1e-6)
    # Held out: two pairs the words decide (calm over bad, then bad over calm), one they cannot (equal scores: half).
    held = [pair("calm fish", "bad fish"), pair("bad rain", "calm rain"), pair("cat", "dog"), pair("x", "y", tie=True)]
    result = baseline_agreement(train, held)
    assert result["bag_of_words"] == 0.5 and result["pairs"] == 3  # (1 + 0 + 0.5) / 3
    assert result["interval"] == pytest.approx(wilson_interval(1.5, 3), abs=1e-3)
    with pytest.raises(ValueError, match="needs decided train pairs"):
        bag_of_words_scorer(train[-1:])


def test_check_scores_an_exports_pairs(setup, tmp_path, capsys):
    """python -m rlhf.rewards: the signals against an export's votes, with the real signals on tiny models."""
    from annotate.export import export
    from annotate.ingest import ingest
    from db import open_db
    from storyworld import annotate_world

    root, world = setup
    annotate_world(world, root / "check-prefs.jsonl", votes_per_pair=3, seed=1)  # beside the world, whose images it names
    _, factory = open_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    ingest(factory, str(root / "check-prefs.jsonl"), "w", media_root=tmp_path / "media")
    with factory() as session:
        export(session, tmp_path / "trl", "trl", aggregate="majority", test_fraction=0.3)
    cfg = CheckConfig(preferences=str(tmp_path / "trl"), split="all", signals="human,clip,repetition", reward_model=str(root / "rm"),
                      clip_model=str(root / "clip"), clip_pretrained=None, cache_dir=str(root / "cache"), out=str(tmp_path / "check.json"))  # fmt: skip
    result = check(cfg)
    assert result["pairs"] > 0 and all(0.0 <= result[k] <= 1.0 for k in ("human", "clip", "repetition"))
    assert json.loads((tmp_path / "check.json").read_text()) == json.loads(json.dumps(result))
    assert "agreement with the annotators" in capsys.readouterr().out and "bag_of_words" not in result  # split all: no held-out yardstick
    held = check(CheckConfig(preferences=str(tmp_path / "trl"), signals="repetition", cache_dir=str(root / "cache")))
    assert 0.0 <= held["bag_of_words"] <= 1.0 and "bag_of_words" in held["interval"] and "the yardstick" in capsys.readouterr().out
    assert "bag_of_words" not in check(CheckConfig(preferences=str(tmp_path / "trl"), signals="repetition", baseline=False))
    mixed = check(CheckConfig(preferences=str(tmp_path / "trl"), split="all", signals="human,repetition", reward_model=str(root / "rm"),
                              mix="repetition=2", baseline=False))  # fmt: skip
    assert mixed["mix"] == mixed["repetition"] and "--mix repetition=2" in capsys.readouterr().out  # one signal, scaled: its own ranking
    with pytest.raises(ValueError, match=r"--mix clip=1: \['clip'\] not among --signals repetition"):
        check(CheckConfig(preferences=str(tmp_path / "trl"), signals="repetition", mix="clip=1"))
    with pytest.raises(ValueError, match=r"--signals names unknown signal\(s\) \['humour'\]"):
        check(CheckConfig(preferences=str(tmp_path / "trl"), signals="human,humour"))
    with pytest.raises(ValueError, match="--split 'val'"):
        check(CheckConfig(preferences=str(tmp_path / "trl"), split="val"))


def test_running_stats_match_the_batch_formula():
    s = RunningStats()
    data = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    s.update(data[:2])
    s.update(data[2:])
    assert s.mean == pytest.approx(data.mean().item())
    assert s.std == pytest.approx(data.std(unbiased=False).item())


@pytest.mark.timeout(600)
def test_two_processes_with_accelerate(setup):
    root, world = setup
    out = root / "ddp"
    cfg = {"policy": str(root / "policy"), "prompts": str(world / "items.jsonl"), "output_dir": str(out), "reward_weights": "repetition=1",
           "iterations": 2, "rollout_batch_size": 2, "mini_batch_size": 1, "ppo_epochs": 1, "max_new_tokens": 6, "value_warmup_steps": 0,
           "clip_model": None, "sentence_model": None}  # fmt: skip
    (root / "ppo.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf.ppo", "--config", str(root / "ppo.yaml")]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["episodes"] == 2 * 2 * 2


def test_trl_reward_funcs_read_trl_prompts_completions_and_images(setup):
    from PIL import Image

    from rlhf.rewards import RepetitionReward, build_reward, trl_reward_funcs

    root, world = setup
    items = [json.loads(x) for x in (world / "items.jsonl").open()][:2]
    frames = [[Image.open(world / p).convert("RGB") for p in i["image_paths"]] for i in items]
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": format_prompt(i["instruction"], i["style"], i["context"])}]}]
               for i in items]  # fmt: skip
    stories = ["A red circle met a blue square. The red circle met a blue square.", "Pip the red star hopped across the meadow."]
    completions = [[{"role": "assistant", "content": s}] for s in stories]
    reward = build_reward({"human": 1.0, "repetition": 0.5}, reward_model=str(root / "rm"), cache_dir=str(root / "cache"))
    human, repetition = trl_reward_funcs(reward)
    assert (human.__name__, repetition.__name__) == ("human", "repetition")  # TRL logs rewards/<name>/mean
    assert repetition(prompts, completions, images=frames) == pytest.approx(RepetitionReward()(None, None, None, None, stories).tolist())
    direct = reward.signals["human"](frames, [i["instruction"] for i in items], [i["context"] for i in items], [i["style"] for i in items], stories)
    assert human(prompts, completions, images=frames) == pytest.approx(direct.tolist(), abs=1e-6)  # the prompt parsed back into its parts
    plain = human([format_prompt(i["instruction"], i["style"], i["context"]) for i in items], stories, image=[f[0] for f in frames])
    assert len(plain) == 2  # plain-text prompts and a single `image` column work too
    (mixed,) = trl_reward_funcs(reward, composite=True)
    assert mixed.__name__ == "storypref" and len(mixed(prompts, completions, images=frames)) == 2
    with pytest.raises(ValueError, match="need the frames"):
        human(prompts, completions)


@pytest.mark.timeout(600)
def test_trl_grpo_trainer_trains_on_storypref_rewards(setup, tmp_path):
    import datasets
    from PIL import Image
    from transformers import AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.rewards import build_reward, trl_reward_funcs

    root, world = setup
    make_tiny.tiny_qwen2_vl(tmp_path / "qwen")
    processor = AutoProcessor.from_pretrained(tmp_path / "qwen")
    # TRL's GRPOTrainer needs left padding for prompts of different lengths with Qwen2-VL (with right
    # padding the image positions shift: huggingface/trl#5785); docs/training.md says so too.
    processor.tokenizer.padding_side = "left"
    items = [json.loads(x) for x in (world / "items.jsonl").open()][:4]
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": format_prompt(i["instruction"], i["style"], i["context"])}]}],
                                      "images": [Image.open(world / i["image_paths"][0]).convert("RGB")]} for i in items])  # fmt: skip
    reward = build_reward({"human": 1.0, "clip": 0.3, "repetition": 0.5}, reward_model=str(root / "rm"), clip_model=str(root / "clip"),
                          cache_dir=str(root / "cache"))  # fmt: skip
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=2, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                      reward_weights=[1.0, 0.3, 0.5])  # fmt: skip
    trainer = GRPOTrainer(model=str(tmp_path / "qwen"), reward_funcs=trl_reward_funcs(reward), args=args, train_dataset=ds,
                          processing_class=processor)  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/human/mean" in h]
    assert len(logged) == 2 and trainer.state.global_step == 2
    for h in logged:
        for name in ("human", "clip", "repetition"):
            assert math.isfinite(h[f"rewards/{name}/mean"]), (name, h)
