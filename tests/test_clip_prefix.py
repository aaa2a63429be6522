"""The clip-prefix family end to end on next-frame windows: SFT from scratch, evaluate, PPO, DPO and the
policy-backbone reward model; and what is its own: the CLIP features, the context slot, the frame limit.

(The generic policy tests, generate/forward agreement, the adapter-off reference, save and load,
multi-frame batches, run on it in tests/test_policy.py with every other family.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.policy import LoraSpec, load_policy
from rlhf.sft import SFTConfig, train
from rlhf.stories import read_examples
from storyworld import make_world
from tests.fixtures import make_tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
WINDOW = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A world of 3-4 frame scenes with frame-tagged SFT stories, a tiny CLIP, and tiny-clip-prefix SFT on --window 2."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    root = tmp_path_factory.mktemp("clip-prefix")
    world = make_world(root / "world", 24, seed=4, frames=(3, 4), image_size=(32, 32), frame_tags=True)
    make_tiny.tiny_clip(root / "clip")
    cfg = SFTConfig(data=str(world / "sft.jsonl"), window=WINDOW, init="tiny-clip-prefix", clip_model=str(root / "clip"), prefix_length=2,
                    output_dir=str(root / "sft"), epochs=4, batch_size=4, lr=3e-3, samples=2, max_new_tokens=16, logging_steps=1)  # fmt: skip
    _, metrics = train(cfg)
    return root, world, metrics


def test_sft_from_scratch_on_windows_learns_and_reloads(trained):
    root, world, metrics = trained
    assert metrics["family"] == "clip-prefix" and metrics["lora"] is False
    examples = read_examples(str(world / "sft.jsonl"), window=WINDOW)
    assert metrics["train_examples"] + metrics["eval_examples"] == len(examples)
    losses = [json.loads(x)["sft/loss"] for x in (root / "sft" / "metrics.jsonl").open() if "sft/loss" in x]
    assert losses[-1] < losses[0] - 1.0, losses
    config = json.loads((root / "sft" / "config.json").read_text())
    assert Path(config["clip_model"]).is_absolute() and config["max_frames"] >= 8  # the CLIP it reads, from any cwd
    policy, again = load_policy(str(root / "sft")), load_policy(str(root / "sft"))
    batch = policy.examples_batch(examples[:3])
    ids, mask = policy.tokenize_responses([e.story for e in examples[:3]])
    torch.testing.assert_close(policy.forward(batch, ids, mask).logprobs, again.forward(batch, ids, mask).logprobs)
    samples = [json.loads(x) for x in (root / "sft" / "samples.jsonl").open()]
    assert len(samples) == 2 and all(s["item_id"].count("/") == 1 for s in samples)  # next parts of held-out windows


def test_the_frames_and_the_context_reach_the_model_and_clip_is_cached(trained):
    from rlhf.data import ImageRef

    root, world, _ = trained
    policy = load_policy(str(root / "sft"))
    e = read_examples(str(world / "sft.jsonl"), window=WINDOW)[0]
    images = e.load_images()
    batch = policy.batch([images], e.instruction, e.style, e.context)
    features = policy.adapter.features
    torch.testing.assert_close(batch.inputs["frame_features"][0], features.images([ImageRef(image=i) for i in images]))
    assert batch.inputs["context_mask"].tolist() == [1] and policy.batch([images], "Go").inputs["context_mask"].tolist() == [0]
    encoded = features.encoded_images
    policy.batch([images], e.instruction)
    assert features.encoded_images == encoded  # the same frames again: from the cache, not the image tower
    # Every input moves the output: each frame by its slot, and the context slot. (The untrained tiny CLIP
    # embeds storyworld's frames almost alike, so the model is probed with distinct vectors.)
    ids, mask = policy.tokenize_responses([e.story])
    g = torch.Generator().manual_seed(0)
    inputs = dict(batch.inputs, frame_features=torch.randn(batch.inputs["frame_features"].shape, generator=g),
                  context_features=torch.randn(batch.inputs["context_features"].shape, generator=g))  # fmt: skip

    def score(**change) -> float:
        probe = type(batch)({**inputs, **change}, batch.prompt_ids, batch.prompt_mask, batch.n_frames)
        return policy.forward(probe, ids, mask).logprobs.sum().item()

    base = score()
    assert score(frame_features=inputs["frame_features"].flip(1)) != pytest.approx(base, abs=1e-3)  # frame order
    assert score(context_features=-inputs["context_features"]) != pytest.approx(base, abs=1e-3)  # the context
    assert score(context_mask=torch.zeros(1, dtype=torch.long)) != pytest.approx(base, abs=1e-3)  # no context
    assert score(frame_mask=torch.tensor([[1, 1, 0]])) != pytest.approx(base, abs=1e-3)  # a masked frame
    with pytest.raises(ValueError, match="at most .* frames .*--window"):
        policy.batch([images * 5], "Tell a story.")  # more frames than max_frames


def test_evaluate_reports_clipscore_against_the_target_frame(trained, tmp_path):
    import rlhf.evaluate as ev

    root, world, _ = trained
    report = ev.main(ev.EvaluateConfig(policy=str(root / "sft"), items=str(world / "sft.jsonl"), window=WINDOW, out=str(tmp_path / "r.json"),
                                       clip_model=str(root / "clip"), clip_pretrained=None, limit=3, max_new_tokens=12))  # fmt: skip
    assert report["items"] == 3 and {"clip_score", "clip_score_target_frame", "bleu"} <= set(report)


def test_ppo_trains_the_adapter_and_mapper_on_windows(trained):
    from rlhf.ppo import PPOConfig
    from rlhf.ppo import train as ppo

    root, world, _ = trained
    base = {k: v.clone() for k, v in load_policy(str(root / "sft")).model.state_dict().items()}
    policy, result = ppo(PPOConfig(policy=str(root / "sft"), prompts=str(world / "sft.jsonl"), window=WINDOW, output_dir=str(root / "ppo"),
                                   reward_weights="repetition=1,clip=1", clip_model=str(root / "clip"), clip_pretrained=None, sentence_model=None,
                                   iterations=2, rollout_batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8, value_warmup_steps=0,
                                   lr=1e-2, cache_dir=str(root / "cache"), save_every=100, sample_every=1))  # fmt: skip
    rows = [json.loads(x) for x in (root / "ppo" / "metrics.jsonl").open()]
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6) and result["iterations"] == 2
    state = policy.model.state_dict()
    moved = {k for k, v in state.items() if "lora_" not in k and "modules_to_save" not in k
             and not torch.equal(v, base[k.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")])}  # fmt: skip
    assert not moved, f"the base weights stay: {sorted(moved)[:3]}"
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    assert any("mapper.modules_to_save" in k and not torch.equal(v, base[k.split(".modules_to_save")[0].replace("base_model.model.", "")
                                                                          + k.split("default")[-1]]) for k, v in state.items())  # fmt: skip
    e = read_examples(str(world / "sft.jsonl"), window=WINDOW)[0]
    batch = policy.examples_batch([e])
    ids, mask = policy.tokenize_responses([e.story])
    sft = load_policy(str(root / "sft")).forward(batch, ids, mask).logprobs
    assert not torch.allclose(policy.forward(batch, ids, mask).logprobs, sft, atol=1e-4)
    with policy.reference():  # the reference is the SFT model: its mapper too, not PPO's trained copy
        torch.testing.assert_close(policy.forward(batch, ids, mask).logprobs, sft)
    assert load_policy(str(root / "ppo")).adapter_hash() == policy.adapter_hash()


def test_dpo_and_the_policy_backbone_reward_model_take_it(trained, tmp_path):
    from annotate.formats import format_prompt
    from rlhf.dpo import DPOConfig
    from rlhf.dpo import main as dpo
    from rlhf.reward_model import RewardModel
    from rlhf.train_rm import TrainRMConfig
    from rlhf.train_rm import train as train_rm

    root, world, _ = trained
    examples = read_examples(str(world / "sft.jsonl"), window=WINDOW)
    rows = [{"prompt": format_prompt(e.instruction, e.style, e.context), "chosen": e.story, "rejected": e.story.split(".")[0] + " red red red.",
             "images": [str(p) for p in e.images], "item_id": e.item_id} for e in examples]  # fmt: skip
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (tmp_path / "trl" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:20]))
    result = dpo(DPOConfig(policy=str(root / "sft"), data=str(tmp_path / "trl"), output_dir=str(tmp_path / "dpo"), batch_size=4, epochs=1,
                           lr=5e-3, max_length=48, logging_steps=1, save_steps=100, warmup_ratio=0.0, device="cpu"))  # fmt: skip
    assert result["family"] == "clip-prefix" and load_policy(str(tmp_path / "dpo")).has_adapter
    _, metrics = train_rm(TrainRMConfig(data=str(tmp_path / "trl"), output_dir=str(tmp_path / "rm"), backbone="policy", text_model=str(root / "sft"),
                                        epochs=1, batch_size=8, lr=5e-3, lora_r=4, max_length=48))  # fmt: skip
    rm = RewardModel.from_pretrained(tmp_path / "rm")
    p = rows[0]
    assert rm.score([[Path(x) for x in p["images"]]], [p["prompt"]], [p["chosen"]]).shape == (1,) and "eval_accuracy" in metrics


def test_init_clip_prefix_needs_its_clip_and_gpt2(tmp_path):
    from rlhf.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="needs --clip_model"):
        train(SFTConfig(data="x.jsonl", init="tiny-clip-prefix", output_dir=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="--language_model"):
        train(SFTConfig(data="x.jsonl", init="clip-prefix", clip_model="ViT-B-32", output_dir=str(tmp_path)))


def test_lora_on_a_clip_prefix_trains_gpt2_projections_and_the_mapper(trained):
    root, _, _ = trained
    policy = load_policy(str(root / "sft"), lora=LoraSpec(r=2))
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert any(".gpt." in n and "lora_" in n for n in trainable)
    assert any("mapper.modules_to_save" in n for n in trainable) and any("slots.modules_to_save" in n for n in trainable)
    assert not any("wte" in n or "wpe" in n for n in trainable)


def test_init_clip_prefix_puts_a_new_mapper_before_a_pretrained_gpt2(trained, tmp_path):
    """--init clip-prefix --language_model DIR: GPT-2's own weights and tokenizer, a new mapper; with
    --lora true, LoRA on GPT-2 and the mapper trained in full."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root, world, _ = trained
    tok = make_tiny.tiny_tokenizer(tmp_path / "gpt2")
    torch.manual_seed(3)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=1024, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))  # fmt: skip
    gpt2.save_pretrained(tmp_path / "gpt2")
    _, metrics = train(SFTConfig(data=str(world / "sft.jsonl"), window=WINDOW, init="clip-prefix", clip_model=str(root / "clip"),
                                 language_model=str(tmp_path / "gpt2"), lora=True, lora_r=4, output_dir=str(tmp_path / "sft"), epochs=1,
                                 batch_size=4, lr=3e-3, samples=1, max_new_tokens=8))  # fmt: skip
    assert metrics["family"] == "clip-prefix" and metrics["lora"] is True
    init = load_policy(str(tmp_path / "sft" / "init"))
    for name, value in gpt2.state_dict().items():  # the new model starts from GPT-2's weights
        torch.testing.assert_close(init.model.gpt.state_dict()[name], value, msg=name)
    tuned = load_policy(str(tmp_path / "sft"))
    assert tuned.has_adapter and tuned.tokenizer.get_vocab() == tok.get_vocab()
    state = tuned.model.state_dict()
    mapper = [k for k in state if "mapper.modules_to_save" in k and k.endswith("weight")]
    assert mapper and any(not torch.equal(state[k], init.model.state_dict()[k.split("base_model.model.")[1].replace("modules_to_save.default.", "")])
                          for k in mapper)  # fmt: skip


def test_a_prompt_longer_than_the_models_positions_is_refused_clearly(trained):
    root, world, _ = trained
    policy = load_policy(str(root / "sft"))
    e = read_examples(str(world / "sft.jsonl"), window=WINDOW)[0]
    limit = policy.model.config.text_config.n_positions
    batch = policy.batch([e.load_images()], e.instruction, e.style, " ".join(["red"] * limit))  # a story so far longer than the model
    with pytest.raises(ValueError, match=r"n_positions.*shorten the story so far"):
        policy.generate(batch, max_new_tokens=8)
    ids, mask = policy.tokenize_responses([e.story])
    with pytest.raises(ValueError, match=r"image prefix.*n_positions"):
        policy.forward(batch, ids, mask)
