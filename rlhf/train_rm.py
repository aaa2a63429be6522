"""Train a multimodal Bradley-Terry reward model on exported preferences.

    python -m rlhf.train_rm --data prefs/ --output_dir runs/rm [--backbone clip-fusion|vlm|policy] [--config rm.yaml]
    accelerate launch --num_processes 8 -m rlhf.train_rm --data prefs/ ...     (DDP, FSDP or DeepSpeed configs)

The data is any export of `annotate.export` (TRL JSONL, per-vote pairs JSONL, or an HF dataset dir).
Each epoch visits the train pairs in an order fixed by the seed and the epoch, evaluates on the
test split, and writes a checkpoint, so `--resume` continues exactly where the last epoch ended.
At the end, the scores of the chosen stories on the train split set the normalization stored
with the model, so that `RewardModel.score` gives them mean 0 and std 1.
`--length_control` fits the labels' taste for length to a separate coefficient in training, so the
saved reward does not pay for length (the eval's `eval_shorter_preferred_*` shows whether it needs to).
`--length_decorrelation λ` adds λ·|r(reward, words)| over each batch (ODIN), for a bias that β, being
linear in the word difference, does not take (`eval_length_correlation` shows what is left).
`--contrast_words FILE` adds synthetic minimal pairs to the train split: chosen stories with one
phrase of the file's word groups swapped (a color, shape, setting), which only the frames or the
story's other mentions can settle (docs/reward-model.md#contrast-pairs).
Writes: the model, `metrics.jsonl` (per logged step), `metrics.json` (final), TensorBoard logs.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from annotate.formats import plain_text
from rlhf.clip import DEFAULT_CACHE
from rlhf.data import DataError, PreferencePair, contrast_pairs, load_preferences, read_contrast_words
from rlhf.entities import FEATURE_NAMES
from rlhf.loading import ModelLoadError
from rlhf.losses import bradley_terry_loss, fit_logit_coef, pearson_correlation, preference_accuracy, shorter_preferred, span_token_loss
from rlhf.reward_model import DEFAULT_TEXT_MODEL, RewardModel, RewardModelConfig
from rlhf.runlog import checkpoint_dir, clip_gradients, device_summary, latest_checkpoint, log_metrics, prefer_safe_attention


@dataclass
class TrainRMConfig:
    data: str = field(metadata={"help": "TRL preference JSONL (file or dir with train.jsonl/test.jsonl), pairs JSONL, or HF dataset dir"})
    output_dir: str = field(default="runs/rm", metadata={"help": "where the model, checkpoints and logs go"})
    backbone: str = field(default="clip-fusion", metadata={"help": "clip-fusion (frozen CLIP + text encoder with LoRA), vlm (LLaVA/Qwen2-VL + LoRA), or policy (a storypref policy dir, usually the SFT one, + LoRA: InstructGPT's reward model)"})
    text_model: str = field(default=DEFAULT_TEXT_MODEL, metadata={"help": "clip-fusion: a Hugging Face AutoModel id or path; vlm: the VLM id or path; policy: the policy dir or id (e.g. runs/sft)"})
    clip_model: str = field(default="ViT-B-32", metadata={"help": "open_clip model name, or a local dir holding open_clip_config.json (e.g. from storyworld train-clip)"})
    clip_pretrained: str | None = field(default="laion2b_s34b_b79k", metadata={"help": "open_clip pretrained tag for --clip_model (ignored for a local dir)"})
    aggregate: str = field(default="majority", metadata={"help": "how the votes on one comparison become a training pair: majority | soft | "
                                                                  "none (pairs JSONL); soft on a TRL/HF export reads each row's `agreement`"})  # fmt: skip
    use_images: bool = field(default=True, metadata={"help": "clip-fusion: read the images (off: a text-only ablation)"})
    use_text_encoder: bool = field(default=True, metadata={"help": "clip-fusion: use the text encoder (off: a CLIP-only ablation)"})
    sentence_alignment: bool = field(default=False, metadata={"help": "clip-fusion: also feed the head sentence↔frame CLIP cosines per frame "
                                                                      "(min, mean and max over the frame's own sentences, the frame's best "
                                                                      "sentence, the story's worst-grounded sentence): a single false look "
                                                                      "or phantom lowers one sentence's match, which a mean hides"})  # fmt: skip
    entity_features: bool = field(default=False, metadata={"help": "clip-fusion: add a learned linear term on who is described how "
                                                                   "(rlhf.entities): how many named characters are given two "
                                                                   "descriptions ('Remy the green square' ... 'Remy the red circle'), "
                                                                   "how many extra, how many are described. It compares mentions "
                                                                   "across sentences, which mean pooling does not; an English "
                                                                   "appositive heuristic, so check it on your data (eval_accuracy "
                                                                   "with and without)"})  # fmt: skip
    span_loss_coef: float = field(default=0.0, metadata={"help": "clip-fusion: λ of a token-level auxiliary loss from the data's span marks "
                                                                 "(annotate.export `spans`): a per-token head, on the text encoder's states "
                                                                 "and the frames, learns that marked tokens score low and a marked story's "
                                                                 "other tokens high, as in fine-grained RLHF; 0 = off"})  # fmt: skip
    text_tuning: str = field(default="lora", metadata={"help": "clip-fusion: lora (adapt the text encoder with LoRA), full (train every "
                                                             "weight of a small encoder such as MiniLM, with --lr near 5e-5; the saved "
                                                             "model holds the whole encoder) or frozen (keep it as it is: its token "
                                                             "states are computed once per story, so an epoch costs only what trains; "
                                                             "pair it with --fusion_layers and more epochs)"})
    fusion_layers: int = field(default=0, metadata={"help": "clip-fusion: transformer layers (width --hidden_size) that read the text "
                                                            "encoder's token states and the frames together, so that a name is bound to "
                                                            "its look across sentences and a word to its frame; 0 = mean pooling"})
    fusion_heads: int = field(default=4, metadata={"help": "attention heads of the fusion layers (must divide --hidden_size)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "modules to adapt (default: peft's choice for the architecture)"})
    hidden_size: int = field(default=256, metadata={"help": "width of the fusion MLP and of --fusion_layers"})
    max_length: int = field(default=256, metadata={"help": "text tokens per (prompt, story); policy: story tokens (a longer story is scored on its start)"})
    epochs: int = field(default=3, metadata={"help": "passes over the train pairs"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW, linear warmup and decay)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the steps spent warming up"})
    batch_size: int = field(default=16, metadata={"help": "pairs per step and process"})
    grad_accum: int = field(default=1, metadata={"help": "steps accumulated per optimizer update"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    center_coef: float = field(default=0.01, metadata={"help": "reward centering: + c·mean((r_c + r_r)²)"})
    length_control: bool = field(default=False, metadata={"help": "length-controlled Bradley-Terry: in training the logit gets a learned term β·(words chosen − words rejected)/s, so that the preference for length in the labels goes to β and not to the reward; the saved model scores without it (check eval_shorter_preferred_model against _labels)"})
    length_decorrelation: float = field(default=0.0, metadata={"help": "λ of an ODIN-style penalty λ·|Pearson r(reward, words)| over each batch's stories (Chen et al. 2024): the reward is kept from carrying length through features that --length_control's linear β does not take; 0 = off (check eval_length_correlation)"})
    contrast_words: str | None = field(default=None, metadata={"help": "a file of word groups, one per line, comma-separated (colors, shapes, objects, settings): a --contrast_share of the decisive train pairs get a contrast pair, their chosen story against itself with one phrase swapped for another of its group, which only the frames (or the story's own other mentions) can settle (docs/reward-model.md)"})
    contrast_share: float = field(default=0.5, metadata={"help": "with --contrast_words: the share of decisive train pairs that get one"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (GPUs that support it)"})
    seed: int = field(default=0, metadata={"help": "seed for the data order and initialization"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    stop_after_epochs: int | None = field(default=None, metadata={"help": "end this run after so many epochs (resume later with --resume)"})
    cache_dir: str | None = field(default=None, metadata={"help": "CLIP embedding cache (default: ~/.cache/storypref/clip)"})
    logging_steps: int = field(default=10, metadata={"help": "log every N optimizer steps"})
    # Derived, filled in by main() so that they are logged with the config.
    train_pairs: int = field(default=0, init=False, metadata={"help": "(derived)"})
    eval_pairs: int = field(default=0, init=False, metadata={"help": "(derived)"})
    steps_per_epoch: int = field(default=0, init=False, metadata={"help": "(derived)"})
    world_size: int = field(default=1, init=False, metadata={"help": "(derived)"})
    length_scale: float = field(default=0.0, init=False, metadata={"help": "(derived) s: the std of the train pairs' word differences"})

    def model_config(self) -> RewardModelConfig:
        return RewardModelConfig(
            backbone=self.backbone, text_model=self.text_model, clip_model=self.clip_model, clip_pretrained=self.clip_pretrained,
            use_images=self.use_images, use_text_encoder=self.use_text_encoder, sentence_alignment=self.sentence_alignment,
            entity_features=self.entity_features,
            span_head=self.span_loss_coef > 0, text_tuning=self.text_tuning, fusion_layers=self.fusion_layers,
            fusion_heads=self.fusion_heads, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, lora_target_modules=self.lora_target_modules, hidden_size=self.hidden_size,
            max_length=self.max_length,
        )  # fmt: skip


LENGTH_COEF_LR = 1e-2  # β's own learning rate: one scalar, which the model's (often 1e-4) would hardly move
ENTITY_LR = 1e-2  # the entity features' linear term (--entity_features): four numbers, moved as far as β is


class TrainingDiverged(RuntimeError):
    pass


def words(story: str) -> int:
    """A story's length in words (grounding tags are not words)."""
    return len(plain_text(story).split())


def pair_targets(pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
    """Per pair: the label P(chosen ≻ rejected), the margin, and the word difference chosen − rejected;
    `words`: each story's length, (2B,) chosen first, as `pair_batch` orders them."""
    chosen, rejected = [float(words(p.chosen)) for p in pairs], [float(words(p.rejected)) for p in pairs]
    return {
        "target": torch.tensor([p.target for p in pairs]),
        "margin": torch.tensor([p.margin for p in pairs]),
        "weight": torch.tensor([p.weight for p in pairs]),
        "word_diff": torch.tensor(chosen) - torch.tensor(rejected),
        "words": torch.tensor(chosen + rejected),
    }


def pair_batch(rm: RewardModel, pairs: list[PreferencePair]) -> tuple[dict, dict]:
    """Model inputs for the chosen and rejected stories (2B rows: chosen first), and the targets."""
    images = [p.images for p in pairs] * 2
    prompts = [p.prompt for p in pairs] * 2
    stories = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return rm.batch(images, prompts, stories), pair_targets(pairs)


class PairEncoder:
    """Model inputs for batches of pairs; clip-fusion encodes every pair once, up front."""

    def __init__(self, rm: RewardModel, pairs: list[PreferencePair], chunk: int = 256):
        self.rm, self.pairs = rm, pairs
        self.encoded = None
        if rm.cfg.backbone == "clip-fusion":
            self.encoded = []
            for k in range(0, len(pairs), chunk):
                part = pairs[k : k + chunk]
                spans = ([p.spans.get("chosen", []) for p in part] + [p.spans.get("rejected", []) for p in part]) if rm.cfg.span_head else None
                ex = rm.encode([p.images for p in part] * 2, [p.prompt for p in part] * 2,
                               [p.chosen for p in part] + [p.rejected for p in part], spans=spans)  # fmt: skip
                self.encoded += list(zip(ex[: len(part)], ex[len(part) :]))

    def __call__(self, indices: list[int]) -> tuple[dict, dict]:
        chunk = [self.pairs[i] for i in indices]
        if self.encoded is None:
            return pair_batch(self.rm, chunk)
        rows = [self.encoded[i] for i in indices]
        return self.rm.collate([c for c, _ in rows] + [r for _, r in rows]), pair_targets(chunk)


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """The pairs one process visits in one epoch: a seeded permutation, sharded evenly."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = n // world
    return order[rank * per_rank : (rank + 1) * per_rank]


@torch.no_grad()
def evaluate(rm: RewardModel, pairs: list[PreferencePair], batch_size: int = 64) -> dict[str, float]:
    """Loss and accuracy (ties left out) on `pairs`, per aspect where labelled, and per named slice where marked."""
    rm.module.eval()
    chosen, rejected, targets, margins = [], [], [], []
    for k in range(0, len(pairs), batch_size):
        chunk = pairs[k : k + batch_size]
        batch, t = pair_batch(rm, chunk)
        scores = rm.raw_scores(batch).float().cpu()  # (2b,)
        chosen.append(scores[: len(chunk)])
        rejected.append(scores[len(chunk) :])
        targets.append(t["target"])
        margins.append(t["margin"])
    rm.module.train()
    if not pairs:
        return {}
    c, r, t = torch.cat(chosen), torch.cat(rejected), torch.cat(targets)
    out = {
        "eval_loss": bradley_terry_loss(c, r, margin=torch.cat(margins), target=t).item(),
        "eval_accuracy": preference_accuracy(c, r, tie=t < 1).item(),
        "eval_pairs": len(pairs),
    }
    lengths = [torch.tensor([words(getattr(p, side)) for p in pairs]) for side in ("chosen", "rejected")]
    # r(reward, words) over the eval stories; --length_decorrelation drives it toward 0
    out["eval_length_correlation"] = pearson_correlation(torch.cat([c, r]), torch.cat(lengths).float()).item()
    bias = shorter_preferred(c, r, *lengths, tie=t < 1)
    if bias["pairs"]:  # the length check: far apart, the model has learned length as a shortcut
        out |= {"eval_shorter_preferred_labels": bias["labels"], "eval_shorter_preferred_model": bias["model"]}
    for aspect in sorted({a for p in pairs for a in p.aspects}):
        idx = [i for i, p in enumerate(pairs) if p.aspects.get(aspect) in ("chosen", "rejected")]
        if idx:
            agree = [(c[i] > r[i]).item() == (pairs[i].aspects[aspect] == "chosen") for i in idx]
            out[f"eval_accuracy_{aspect}"] = sum(agree) / len(agree)
    return out | slice_accuracies(c, r, t, [p.slices for p in pairs]) | span_head_accuracy(rm, pairs, batch_size)


@torch.no_grad()
def span_head_accuracy(rm: RewardModel, pairs: list[PreferencePair], batch_size: int = 64) -> dict[str, float]:
    """The span head on the held-out stories with marks: its token accuracy (fine vs marked, at logit 0),
    and the share of marked tokens it scores as marked (`eval_span_marked_recall`)."""
    stories = [(p, side) for p in pairs for side in ("chosen", "rejected") if p.spans.get(side)]
    if not rm.cfg.span_head or not stories:
        return {}
    rm.module.eval()
    right = total = caught = marked = 0
    for k in range(0, len(stories), batch_size):
        part = stories[k : k + batch_size]
        ex = rm.encode([p.images for p, _ in part], [p.prompt for p, _ in part], [getattr(p, side) for p, side in part],
                       spans=[p.spans[side] for p, side in part])  # fmt: skip
        batch = rm.collate(ex)
        labels = batch.pop("token_labels")
        _, logits = rm.module(**{k_: v.to(rm.device) for k_, v in batch.items()}, token_labels=labels.to(rm.device))
        keep = labels != -100
        said = (logits.float().cpu() > 0).long()
        right += int((said[keep] == labels[keep]).sum())
        total += int(keep.sum())
        caught += int(((said == 0) & (labels == 0)).sum())
        marked += int((labels == 0).sum())
    rm.module.train()
    return {"eval_span_token_accuracy": right / max(total, 1), "eval_span_marked_recall": caught / max(marked, 1)}


def slice_accuracies(chosen: torch.Tensor, rejected: torch.Tensor, target: torch.Tensor, slices: list[tuple[str, ...]]) -> dict[str, float]:
    """Accuracy on each named slice of the eval pairs (ties left out), e.g. `eval_accuracy_image_only`.

    >>> slice_accuracies(torch.tensor([1., 0., 2.]), torch.tensor([0., 1., 1.]), torch.ones(3), [("image-only",), (), ("image-only",)])
    {'eval_pairs_image_only': 2, 'eval_accuracy_image_only': 1.0}
    """
    out: dict[str, float] = {}
    for name in sorted({s for names in slices for s in names}):
        idx = torch.tensor([i for i, names in enumerate(slices) if name in names])
        key = re.sub(r"\W", "_", name)
        out[f"eval_pairs_{key}"] = len(idx)
        if (target[idx] == 1).any():  # a slice of ties only has no accuracy
            out[f"eval_accuracy_{key}"] = preference_accuracy(chosen[idx], rejected[idx], tie=target[idx] < 1).item()
    return out


def _save_checkpoint(path: Path, rm: RewardModel, optimizer, scheduler, state: dict) -> None:
    from safetensors.torch import save_file

    with checkpoint_dir(path) as tmp:
        save_file(rm.trained_state(), tmp / "trained.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))


def train(cfg: TrainRMConfig) -> tuple[RewardModel, dict]:
    """Train per `cfg`; returns the model (normalized, unwrapped) and the final metrics."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    if cfg.span_loss_coef < 0:
        raise ValueError(f"--span_loss_coef {cfg.span_loss_coef}: give λ ≥ 0 (0 turns the span head off; 0.5 is a start)")
    if cfg.span_loss_coef and (cfg.backbone != "clip-fusion" or not cfg.use_text_encoder):
        raise ValueError("--span_loss_coef needs --backbone clip-fusion with its text encoder: the span head scores the text encoder's tokens")
    if cfg.length_decorrelation < 0:
        raise ValueError(f"--length_decorrelation {cfg.length_decorrelation}: give λ ≥ 0 (0 turns it off; ODIN used about 1 on large batches, and 0.2 suits batches of 8 pairs)")
    if cfg.contrast_words and not 0.0 < cfg.contrast_share <= 1.0:
        raise ValueError(f"--contrast_share {cfg.contrast_share}: use a value in (0, 1]")
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", gradient_accumulation_steps=cfg.grad_accum)
    prefer_safe_attention()
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    ckpt = out / "checkpoint-last"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    log = accelerator.print

    # 1. Data: detect the format, split by item if there is no test split.
    train, test, message = load_preferences(cfg.data, cfg.aggregate)
    contrast = contrast_pairs(train, read_contrast_words(cfg.contrast_words), cfg.contrast_share, cfg.seed) if cfg.contrast_words else []
    if cfg.contrast_words and not contrast:
        raise DataError(f"{cfg.contrast_words}: no chosen story in {cfg.data} holds a phrase of these groups, so no contrast pair "
                        "was made; check the words against the stories")  # fmt: skip
    train = train + contrast  # train only: the held-out figures stay the annotators' pairs
    log(message + (f"; {len(contrast)} contrast pairs added to the train split" if contrast else ""))
    if cfg.span_loss_coef and not any(p.spans for p in train):
        raise DataError(f"{cfg.data}: --span_loss_coef {cfg.span_loss_coef} needs span marks, and no train pair has any. Export a "
                        "project whose annotators mark words (annotate.ingest --span-marks), or leave --span_loss_coef at 0")  # fmt: skip
    cfg.train_pairs, cfg.eval_pairs, cfg.world_size = len(train), len(test), accelerator.num_processes
    cfg.steps_per_epoch = len(train) // (cfg.world_size * cfg.batch_size) // cfg.grad_accum
    if cfg.steps_per_epoch == 0:
        raise DataError(f"{cfg.data}: {len(train)} train pairs are fewer than one update "
                        f"({cfg.world_size} processes × {cfg.batch_size} pairs × {cfg.grad_accum}); lower --batch_size")  # fmt: skip
    length_labels = 0.0  # the labels' own taste for length, β fit on length alone
    if cfg.length_control and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"--length_control trains β outside the model, which {accelerator.distributed_type.value} does not shard or "
                         "step; run it with plain DDP (accelerate launch --multi_gpu) or on one process")  # fmt: skip
    if cfg.length_control:
        t = pair_targets(train)
        cfg.length_scale = max(t["word_diff"].std().item(), 1.0) if len(train) > 1 else 1.0
        length_labels = fit_logit_coef(t["word_diff"] / cfg.length_scale, t["target"])
        log(f"length control: the labels alone give β = {length_labels:+.3f} log-odds per {cfg.length_scale:.1f} words more")

    # 2. Model; frozen CLIP features for every image and story, computed (or read from cache) once.
    cache = cfg.cache_dir or str(DEFAULT_CACHE)
    rm = RewardModel.build(cfg.model_config(), cache_dir=cache, device=str(accelerator.device))
    if rm.features is not None:
        with accelerator.main_process_first():  # the main process fills the disk cache, the rest read it
            for pairs in (train, test):
                rm.features.images([i for p in pairs for i in p.images])
                for k in range(0, len(pairs), 1024):  # the text tower, batched; in chunks, so memory stays flat on a large dataset
                    chunk = pairs[k : k + 1024]
                    frames = [max(1, min(len(p.images), rm.cfg.max_frames)) for p in chunk]
                    rm.features.stories([p.chosen for p in chunk] + [p.rejected for p in chunk], frames + frames)
        log(f"CLIP features ready: {rm.features.encoded_images} images encoded, the rest from {cache}")
    encoder = PairEncoder(rm, train)

    # 3. Optimizer over the trained weights only (LoRA and head), schedule, accelerate.
    entity = [p for n, p in rm.module.named_parameters() if n.startswith("entity_head.")]
    params = [p for n, p in rm.module.named_parameters() if p.requires_grad and not n.startswith("entity_head.")]
    # β of --length_control: one scalar outside the model (the saved reward never carries it). It starts
    # at the labels' own taste for length, so the reward has no length to learn from the first step,
    # and trains with the reward, which can take back the part of it that quality explains.
    length_coef = torch.tensor(length_labels, device=accelerator.device, requires_grad=True)
    groups = [{"params": params}] + ([{"params": [length_coef], "lr": LENGTH_COEF_LR, "weight_decay": 0.0}] if cfg.length_control else [])
    groups += [{"params": entity, "lr": ENTITY_LR, "weight_decay": 0.0}] if entity else []
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_updates = cfg.steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_updates), total_updates)
    # Train through the wrapped module; evaluate and save through rm.module, the same weights unwrapped
    # (its state-dict keys have no DDP prefix, and a forward on one rank alone cannot hang DDP).
    ddp_module, optimizer, scheduler = accelerator.prepare(rm.module, optimizer, scheduler)
    start_epoch, step = 0, 0
    if cfg.resume:
        found = latest_checkpoint(ckpt)
        if not (found / "trainer_state.json").exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {found}; run without --resume first")
        from safetensors.torch import load_file

        rm.module.load_state_dict(load_file(found / "trained.safetensors"), strict=False)
        saved = torch.load(found / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        state = json.loads((found / "trainer_state.json").read_text())
        start_epoch, step = state["epoch"] + 1, state["step"]
        with torch.no_grad():
            length_coef.fill_(state.get("length_coef", length_labels))
        log(f"resumed from {found}: epoch {start_epoch}, step {step}")
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    jsonl = out / "metrics.jsonl"
    if not cfg.resume and accelerator.is_main_process:
        jsonl.unlink(missing_ok=True)  # a fresh run starts a fresh log; --resume appends

    # 4. Train: a fixed order per epoch, evaluation and a checkpoint after each.
    ddp_module.train()
    pairs_seen, train_seconds, metrics = 0, 0.0, {}
    last_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        order = epoch_order(len(train), cfg.seed, epoch, accelerator.process_index, accelerator.num_processes)
        n_batches = cfg.steps_per_epoch * cfg.grad_accum
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not accelerator.is_main_process)
        t0 = time.perf_counter()
        window = {"loss": [], "accuracy": [], "margin": [], "length_correlation": []}
        for b in bar:
            chunk = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            batch, t = encoder(chunk)
            with accelerator.accumulate(ddp_module):
                out_ = ddp_module(**{k: v.to(accelerator.device) for k, v in batch.items()})
                scores, token_logits = out_ if isinstance(out_, tuple) else (out_, None)
                scores = scores.float()  # (2B,)
                chosen, rejected = scores[: len(chunk)], scores[len(chunk) :]
                target, margin = t["target"].to(scores.device), t["margin"].to(scores.device)
                offset = length_coef * t["word_diff"].to(scores.device) / cfg.length_scale if cfg.length_control else None
                loss = bradley_terry_loss(chosen, rejected, margin=margin, target=target, center_coef=cfg.center_coef, offset=offset,
                                          weight=t["weight"].to(scores.device))  # fmt: skip
                if token_logits is not None:
                    span_loss = span_token_loss(token_logits.float(), batch["token_labels"].to(scores.device))
                    loss = loss + cfg.span_loss_coef * span_loss
                    window.setdefault("span_loss", []).append(span_loss.item())
                length_corr = pearson_correlation(scores, t["words"].to(scores.device))
                if cfg.length_decorrelation:
                    loss = loss + cfg.length_decorrelation * length_corr.abs()
                finite = accelerator.reduce(torch.tensor([float(torch.isfinite(loss))], device=accelerator.device), "sum")
                if finite.item() < accelerator.num_processes:
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step}. Stopped; the last good checkpoint "
                        f"is {ckpt if ckpt.exists() else 'none yet'}. Lower --lr or raise --max_grad_norm clipping."
                    )
                accelerator.backward(loss)
                if cfg.length_control and accelerator.num_processes > 1:  # β is outside DDP: average its gradient by hand
                    length_coef.grad = accelerator.reduce(length_coef.grad.reshape(1), "mean").reshape(())
                if accelerator.sync_gradients:
                    clip_gradients(accelerator, params, cfg.max_grad_norm, f"rlhf.train_rm epoch {epoch + 1}, step {step + 1}", ckpt)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            pairs_seen += len(chunk) * accelerator.num_processes
            window["loss"].append(loss.item())
            window["accuracy"].append(preference_accuracy(chosen.detach(), rejected.detach(), tie=target < 1).item())
            window["margin"].append((chosen - rejected).mean().item())
            window["length_correlation"].append(length_corr.item())
            if accelerator.sync_gradients:
                step += 1
                if step % cfg.logging_steps == 0 and accelerator.is_main_process:
                    m = {f"rm/{k}": sum(v) / len(v) for k, v in window.items() if v}
                    m["rm/lr"] = scheduler.get_last_lr()[0]
                    m["rm/epoch"] = epoch + b / n_batches
                    if cfg.length_control:
                        m["rm/length_coef"] = length_coef.item()
                    if entity:
                        m |= {f"rm/entity_{k}": w for k, w in zip(FEATURE_NAMES, rm.module.entity_head.weight[0].tolist())}
                    log_metrics(writer, jsonl, step, m)
                    bar.set_postfix(loss=f"{m['rm/loss']:.3f}", acc=f"{m['rm/accuracy']:.2f}")
                    window = {k: [] for k in window}
        train_seconds += time.perf_counter() - t0
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            metrics = evaluate(rm, test)
            log_metrics(writer, jsonl, step, {f"rm/{k}": v for k, v in metrics.items()} | {"rm/epoch": epoch + 1})
            log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            _save_checkpoint(ckpt, rm, optimizer, scheduler, {"epoch": epoch, "step": step, "length_coef": length_coef.item(), "config": asdict(cfg)})
        accelerator.wait_for_everyone()

    # 5. Normalize on the train split's chosen stories, save the model and the final metrics.
    result: dict = {}
    if accelerator.is_main_process:
        if last_epoch == cfg.epochs:
            sample = train[:: max(1, len(train) // 2000)]
            rm.module.eval()  # no dropout: the statistics must be those score() will see
            rm.cfg.norm_mean, rm.cfg.norm_std = 0.0, 1.0
            raw = torch.cat([rm.raw_scores(rm.batch([p.images for p in sample[k : k + 64]], [p.prompt for p in sample[k : k + 64]],
                                                    [p.chosen for p in sample[k : k + 64]])).float().detach().cpu()
                             for k in range(0, len(sample), 64)])  # fmt: skip
            rm.cfg.norm_mean, rm.cfg.norm_std = raw.mean().item(), max(raw.std().item(), 1e-6)
            rm.save_pretrained(out)
        result = {
            **(metrics or evaluate(rm, test)),
            "train_pairs": len(train),
            "contrast_pairs": len(contrast),
            "eval_pairs": len(test),
            "pairs_per_second": round(pairs_seen / train_seconds, 2) if train_seconds else None,
            "epochs_done": last_epoch,
            "world_size": accelerator.num_processes,
            "norm_mean": rm.cfg.norm_mean,
            "norm_std": rm.cfg.norm_std,
            "data_format": message,
            **device_summary(accelerator),
        }
        if cfg.entity_features:  # the raw score each feature adds per unit (norm_std divides it in score())
            result["entity_weights"] = dict(zip(FEATURE_NAMES, (round(w, 4) for w in rm.module.entity_head.weight[0].tolist())))
        if cfg.length_control:  # log-odds the labels give per s more words, s = length_scale
            result |= {"length_coef": length_coef.item(), "length_coef_labels": length_labels, "length_scale": cfg.length_scale}
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        if writer is not None:
            writer.close()
        log(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    return rm, result


def main(cfg: TrainRMConfig) -> dict:
    return train(cfg)[1]


def parse_args(argv: list[str] | None = None) -> TrainRMConfig:
    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[TrainRMConfig], description=__doc__.split("\n\n")[0]).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    import sys

    try:
        main(parse_args())
    except (DataError, ModelLoadError, TrainingDiverged, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
