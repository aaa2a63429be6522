"""rlhf.sft, rlhf.generate and rlhf.evaluate on a tiny storyworld and tiny models."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select

from rlhf import evaluate as ev
from rlhf.generate import GenerateConfig
from rlhf.generate import main as generate_main
from rlhf.policy import load_policy
from rlhf.sft import SFTConfig, train, word_tokenizer
from rlhf.stories import StoryDataError, read_examples
from storyworld.world import make_world
from tests.fixtures import make_tiny


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), 24, seed=3, frames=(1, 2), image_size=(48, 32))


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def sft_policy(world, tmp_path_factory):
    """tiny-vit-gpt2 trained 4 epochs on the world: (output dir, metrics)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("sft")
    cfg = SFTConfig(data=str(world / "sft.jsonl"), init="tiny-vit-gpt2", output_dir=str(out), epochs=4, batch_size=4, lr=3e-3,
                    image_size=32, samples=3, max_new_tokens=20, logging_steps=1)  # fmt: skip
    _, metrics = train(cfg)
    return out, metrics


def test_word_tokenizer_round_trips_the_world_text(tmp_path):
    text = "Bravely, one sunny day in the forest, Bo the blue star charged ahead bravely. Momo met Bo."
    tok = word_tokenizer([text], tmp_path)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert len(ids) == len(text.replace(",", " ,").replace(".", " .").split())  # a token per word and per mark


def test_sft_from_scratch_learns_and_writes_everything(sft_policy):
    out, metrics = sft_policy
    for name in ("metrics.json", "metrics.jsonl", "samples.jsonl", "storypref_policy.json", "checkpoint-last/state.pt"):
        assert (out / name).exists(), name
    losses = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    train_losses = [r["sft/loss"] for r in losses if "sft/loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0, train_losses  # a from-scratch model learns the grammar fast
    assert metrics["lora"] is False and metrics["family"] == "vision-encoder-decoder"
    assert metrics["eval_loss"] < 7.0
    policy = load_policy(str(out))
    assert policy.family == "vision-encoder-decoder" and not policy.has_adapter
    assert len([json.loads(x) for x in (out / "samples.jsonl").open()]) == 1  # 24 items, 5% held out


def test_lora_sft_changes_only_the_adapter_and_resume_is_exact(world, tmp_path):
    make_tiny.tiny_llava(tmp_path / "llava")
    base = {k: v.clone() for k, v in load_policy(str(tmp_path / "llava")).model.state_dict().items()}
    common = dict(data=str(world / "sft.jsonl"), policy=str(tmp_path / "llava"), epochs=2, batch_size=4, samples=0, lr=5e-3)
    full, _ = train(SFTConfig(output_dir=str(tmp_path / "full"), **common))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    train(SFTConfig(output_dir=str(tmp_path / "split"), stop_after_epochs=1, **common))
    AcceleratorState._reset_state(True)
    resumed, _ = train(SFTConfig(output_dir=str(tmp_path / "split"), resume=True, **common))
    state = full.model.state_dict()
    lora = [k for k in state if "lora_" in k]
    assert lora and all(not torch.equal(state[k], torch.zeros_like(state[k])) for k in lora if "lora_B" in k)
    frozen = [k for k in state if "lora_" not in k]
    for k in frozen:  # every base weight as loaded
        name = k.replace("base_model.model.", "").replace(".base_layer", "")
        torch.testing.assert_close(state[k], base[name], msg=k)
    for k, v in resumed.model.state_dict().items():  # 1 epoch + resume 1 epoch == 2 epochs straight
        torch.testing.assert_close(v, state[k], msg=k)
    saved = load_file(tmp_path / "full" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def test_sft_data_errors_name_the_line(tmp_path, world):
    lines = (world / "sft.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["image_paths"] = ["images/nope.png"]
    (tmp_path / "images").symlink_to(world / "images")
    (tmp_path / "sft.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(StoryDataError, match=r"sft.jsonl:2: image 'images/nope.png' not found"):
        read_examples(str(tmp_path / "sft.jsonl"), need_story=True)
    del bad["story"]
    bad["image_paths"] = json.loads(lines[0])["image_paths"]
    (tmp_path / "sft.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(StoryDataError, match=r"sft.jsonl:1: needs a non-empty `story`"):
        read_examples(str(tmp_path / "sft.jsonl"), need_story=True)


def test_generate_writes_an_ingestable_file_with_origins(sft_policy, world, tmp_path):
    out, _ = sft_policy
    result = generate_main(GenerateConfig(policy=str(out), items=str(world / "items.jsonl"), per_item=2, limit=3,
                                          out=str(tmp_path / "new.jsonl"), max_new_tokens=16, device="cpu"))  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "new.jsonl").open()]
    assert len(rows) == 3 and result["new_candidates"] == sum(1 for r in rows for c in r["candidates"] if c["origin"].startswith("policy:"))
    original = [json.loads(x) for x in (world / "items.jsonl").open()][:3]
    for row, item in zip(rows, original):
        assert row["candidates"][: len(item["candidates"])] == item["candidates"]  # the old ones kept, in order
        new = row["candidates"][len(item["candidates"]) :]
        assert new and all(c["gen_params"]["temperature"] == 0.9 and c["gen_params"]["style"] == item["style"] for c in new)
    from annotate.ingest import read_source

    _, records = read_source(str(tmp_path / "new.jsonl"), image_root=world)
    assert len(records) == 3


def test_generate_into_the_database_shows_up_as_new_comparisons(sft_policy, world, tmp_path):
    from annotate.ingest import ingest
    from annotate.scheduler import next_assignment
    from db import Annotator, Candidate, Comparison, Project, open_db

    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    _, factory = open_db(url)
    ingest(factory, str(world / "items.jsonl"), "demo", media_root=tmp_path / "media")
    with factory() as s:
        before = s.scalar(select(func.count(Comparison.id)))
    out, _ = sft_policy
    result = generate_main(GenerateConfig(policy=str(out), db=url, project="demo", per_item=1, limit=4, max_new_tokens=16, device="cpu"))
    assert result["candidates_added"] >= 1 and result["items_added"] == 0  # new stories on the existing items
    with factory.begin() as s:
        new_ids = set(s.scalars(select(Candidate.id).where(Candidate.origin.like("policy:%"))))
        fresh = s.scalars(select(Comparison).where(Comparison.candidate_a_id.in_(new_ids) | Comparison.candidate_b_id.in_(new_ids))).all()
        assert len(fresh) == s.scalar(select(func.count(Comparison.id))) - before > 0
        # The app's scheduler serves them: answer everything else first and they remain.
        user = Annotator(username="ann", password_hash=None, role="annotator")
        s.add(user)
        s.flush()
        project = s.scalar(select(Project).where(Project.name == "demo"))
        served = set()
        for _ in range(500):
            a = next_assignment(s, user.id, project, rng=random.Random(0), skipped=frozenset(served))
            if a is None:
                break
            served.add(a.comparison_id)
        assert {c.id for c in fresh} <= served
    # Generating again from the same policy and seed adds nothing twice.
    again = generate_main(GenerateConfig(policy=str(out), db=url, project="demo", per_item=1, limit=4, max_new_tokens=16, device="cpu"))
    assert again["candidates_added"] == 0


def test_best_of_needs_a_reward_model(sft_policy, world, tmp_path):
    from rlhf.loading import ModelLoadError

    out, _ = sft_policy
    with pytest.raises(ModelLoadError, match="--best_of needs --reward"):
        generate_main(GenerateConfig(policy=str(out), items=str(world / "items.jsonl"), best_of=4, out=str(tmp_path / "x.jsonl")))
    assert not (tmp_path / "x.jsonl").exists()


def test_best_of_keeps_the_highest_reward(sft_policy, world, tmp_path):
    from rlhf.reward_model import RewardModel, RewardModelConfig

    make_tiny.tiny_text_encoder(tmp_path / "enc")
    make_tiny.tiny_clip(tmp_path / "clip")
    rm = RewardModel.build(RewardModelConfig(text_model=str(tmp_path / "enc"), clip_model=str(tmp_path / "clip"), clip_pretrained=None))
    rm.save_pretrained(tmp_path / "rm")
    out, _ = sft_policy
    cfg = GenerateConfig(policy=str(out), items=str(world / "items.jsonl"), per_item=1, best_of=4, reward=str(tmp_path / "rm"), limit=2,
                         out=str(tmp_path / "best.jsonl"), max_new_tokens=16, temperature=1.5, device="cpu")  # fmt: skip
    generate_main(cfg)
    rows = [json.loads(x) for x in (tmp_path / "best.jsonl").open()]
    # Re-draw the same samples (same seed) and score them all: the kept one must be the best.
    from rlhf.generate import items_from_file

    torch.manual_seed(cfg.seed)
    policy = load_policy(str(out))
    items = items_from_file(cfg.items, 2)
    batch = policy.examples_batch([e for e, _ in items])
    samples = policy.generate(batch.repeat(4), max_new_tokens=16, temperature=1.5).texts
    scores = RewardModel.from_pretrained(tmp_path / "rm").score([e.images for e, _ in items for _ in range(4)],
                                                                 [e.instruction for e, _ in items for _ in range(4)], samples,
                                                                 context=[e.context for e, _ in items for _ in range(4)],
                                                                 style=[e.style for e, _ in items for _ in range(4)])  # fmt: skip
    for i, row in enumerate(rows):
        kept = row["candidates"][-1]
        best = max(range(i * 4, i * 4 + 4), key=lambda j: scores[j].item())
        assert kept["text"] == samples[best] and kept["gen_params"]["reward"] == pytest.approx(scores[best].item(), abs=1e-3)


def test_distinct_n_and_length_by_hand():
    assert ev.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert ev.distinct_n(["a b", "a b"], 1) == pytest.approx(2 / 4)
    assert ev.distinct_n(["one"], 2) == 0.0
    assert ev.mean_length(["one two", "three four five six"]) == 3.0
    assert ev.bleu(["the red circle rolled away"], ["the red circle rolled away"]) == pytest.approx(100.0)
    assert ev.bleu(["blue square"], ["the red circle rolled away"]) < 10


def test_clip_score_is_hessels_formula_per_frame_and_sentence(tmp_path):
    from PIL import Image

    from rlhf.clip import ClipFeatures

    make_tiny.tiny_clip(tmp_path / "clip")
    features = ClipFeatures(str(tmp_path / "clip"), None)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    story = "A red circle. It rolled.\n\nA blue square."  # frame 1: two sentences; frame 2: one
    got = ev.clip_score(features, [images], [story])[0].item()
    from rlhf.data import ImageRef

    img = features.images([ImageRef(image=i) for i in images])
    first, second = features.sentences(["A red circle.", "It rolled."]), features.sentences(["A blue square."])
    frame1 = (2.5 * (first @ img[0]).clamp(min=0)).mean().item()
    frame2 = (2.5 * (second @ img[1]).clamp(min=0)).mean().item()
    assert got == pytest.approx((frame1 + frame2) / 2, abs=1e-5)


def test_evaluate_writes_a_report(sft_policy, world, tmp_path):
    out, _ = sft_policy
    make_tiny.tiny_clip(tmp_path / "clip")
    report = ev.main(ev.EvaluateConfig(policy=str(out), items=str(world / "sft.jsonl"), out=str(tmp_path / "r.json"),
                                       clip_model=str(tmp_path / "clip"), clip_pretrained=None, limit=4, max_new_tokens=16))  # fmt: skip
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["items"] == 4 and len(saved["samples"]) == 4
    for key in ("clip_score", "bleu", "distinct_1", "distinct_2", "mean_length"):
        assert isinstance(report[key], float), key
    assert report["distinct_2"] == pytest.approx(ev.distinct_n([s["story"] for s in saved["samples"]], 2))


def test_an_hf_dataset_with_the_storyreasoning_schema_reads_as_examples(tmp_path):
    import datasets
    from PIL import Image

    ds = datasets.Dataset.from_dict({"story_id": ["s1", "s2"], "images": [[Image.new("RGB", (8, 8), "red")] * 2, [Image.new("RGB", (8, 8), "blue")]],
                                     "story": ["A red circle. It rolled.", "A blue square."]})  # fmt: skip
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "sr"))
    examples = read_examples(str(tmp_path / "sr"), need_story=True)
    assert [e.item_id for e in examples] == ["s1", "s2"] and [len(e.images) for e in examples] == [2, 1]
    assert examples[0].load_images()[0].getpixel((0, 0)) == (255, 0, 0)
    assert examples[1].instruction == "Write a story about these images."
    with pytest.raises(StoryDataError, match="no split 'test'"):
        read_examples(str(tmp_path / "sr"), split="test")
    datasets.Dataset.from_dict({"story_id": ["s"], "text": ["x"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(StoryDataError, match=r"missing columns \['images', 'story'\]"):
        read_examples(str(tmp_path / "bad"))


def test_init_starts_from_a_pretrained_vision_encoder(world, tmp_path):
    """--vision_encoder: the encoder-decoder's ViT holds exactly the given ViT's weights and its processor."""
    from transformers import AutoImageProcessor, ViTConfig, ViTImageProcessor, ViTModel

    from rlhf.loading import ModelLoadError
    from rlhf.sft import build_tiny_vit_gpt2
    from storyworld.vision import VIT_CONFIG

    torch.manual_seed(1)
    vit_dir = tmp_path / "vit"
    vit = ViTModel(ViTConfig(image_size=32, **VIT_CONFIG), add_pooling_layer=False)
    vit.save_pretrained(vit_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_dir)
    examples = read_examples(str(world / "sft.jsonl"), need_story=True)
    out = build_tiny_vit_gpt2(examples, tmp_path / "init", image_size=64, vision_encoder=str(vit_dir))
    policy = load_policy(str(out))
    encoder = policy.model.encoder.state_dict()
    for name, value in vit.state_dict().items():
        assert torch.equal(encoder[name], value), name
    assert AutoImageProcessor.from_pretrained(out).size == {"height": 32, "width": 32}  # the ViT's own, not --image_size
    random_init = load_policy(str(build_tiny_vit_gpt2(examples, tmp_path / "random", image_size=32)))
    random_config = random_init.model.config.encoder  # storyworld's pretrained ViT is the same size as the random one
    assert {k: getattr(random_config, k) for k in VIT_CONFIG} == VIT_CONFIG
    assert not torch.equal(random_init.model.encoder.state_dict()["embeddings.patch_embeddings.projection.weight"],
                           vit.state_dict()["embeddings.patch_embeddings.projection.weight"])  # fmt: skip

    with pytest.raises(ModelLoadError, match="--vision_encoder"):
        build_tiny_vit_gpt2(examples, tmp_path / "bad", vision_encoder=str(tmp_path / "no-such-dir"))
    with pytest.raises(ModelLoadError, match="--vision_encoder sets the ViT of a fresh --init model"):
        train(SFTConfig(data=str(world / "sft.jsonl"), policy=str(out), output_dir=str(tmp_path / "x"), vision_encoder=str(vit_dir)))


def test_next_frame_windows_by_hand():
    from annotate.formats import next_frame_windows

    tagged = "<gdi image1>A.</gdi><gdi image2>B.</gdi><gdi image3><gdo char1>C</gdo>.</gdi><gdi image4>D.</gdi>"
    assert next_frame_windows(tagged, 4, 2) == [(2, "A. B.", "<gdi image3><gdo char1>C</gdo>.</gdi>"), (3, "A. B. C.", "<gdi image3>D.</gdi>")]
    assert next_frame_windows(tagged, 4, 4) == [] and next_frame_windows(tagged, 2, 2) == []  # K frames or fewer: none
    assert next_frame_windows("One. Two. Three. Four.", 2, 1) == [(1, "One. Two.", "Three. Four.")]  # untagged: sentences split evenly
    with pytest.raises(ValueError, match="1 or more"):
        next_frame_windows(tagged, 4, 0)


def test_windows_from_a_storyreasoning_dataset_split_by_story(tmp_path):
    from rlhf.sft import split_examples
    from tests.fixtures.storyreasoning import tiny_storyreasoning

    src = tiny_storyreasoning(tmp_path / "sr", [2, 3, 5, 6, 4])
    examples = read_examples(str(src), window=2)
    assert [e.item_id for e in examples] == ["s1/3", "s2/3", "s2/4", "s2/5", "s3/3", "s3/4", "s3/5", "s3/6", "s4/3", "s4/4"]
    assert all(len(e.images) == 3 for e in examples)
    s3_6 = examples[7]
    assert s3_6.load_images()[-1].getpixel((0, 0)) == (255, 0, 0)  # the window's last image is frame 6 of s3 (red in the fixture)
    assert s3_6.context.endswith("Ana sees purple in frame 4 of s3. Ana sees orange in frame 5 of s3.")
    assert s3_6.story == "<gdi image3><gdo char1>Ana</gdo> sees white in frame 6 of s3.</gdi>" and s3_6.group == "s3"
    for seed in range(5):
        train, held = split_examples(examples, 0.34, seed)
        assert held and not {e.group for e in train} & {e.group for e in held}  # no story on both sides
    with pytest.raises(StoryDataError, match="too short for --window 6"):
        read_examples(str(src), window=6)


def test_sft_and_evaluate_on_next_frame_windows(world, tmp_path):
    """--window 1 on the world's 2-frame stories: SFT trains on the second frame's part, and evaluate
    scores the written part against that frame alone as well as against both."""
    examples = read_examples(str(world / "sft.jsonl"), window=1)
    assert examples and all(len(e.images) == 2 and e.meta["frame"] == 2 and e.context for e in examples)
    cfg = SFTConfig(data=str(world / "sft.jsonl"), window=1, init="tiny-vit-gpt2", output_dir=str(tmp_path / "sft"), epochs=1,
                    batch_size=4, lr=3e-3, image_size=32, samples=2, max_new_tokens=12, logging_steps=1)  # fmt: skip
    _, metrics = train(cfg)
    assert metrics["train_examples"] + metrics["eval_examples"] == len(examples)
    make_tiny.tiny_clip(tmp_path / "clip")
    report = ev.main(ev.EvaluateConfig(policy=str(tmp_path / "sft"), items=str(world / "sft.jsonl"), window=1, out=str(tmp_path / "r.json"),
                                       clip_model=str(tmp_path / "clip"), clip_pretrained=None, limit=3, max_new_tokens=12))  # fmt: skip
    assert report["items"] == 3 and {"clip_score", "clip_score_target_frame", "bleu"} <= set(report)
    assert [s["item_id"] for s in report["samples"]] == [e.item_id for e in examples[:3]]
