"""Direct preference optimization of a story policy, straight from an annotate.export.

    python -m rlhf.dpo --policy runs/sft --data runs/trl --output_dir runs/dpo
    python -m rlhf.dpo --policy Qwen/Qwen2-VL-2B-Instruct --sft_adapter runs/sft --data runs/trl --loss_type ipo --beta 0.5
    python -m rlhf.dpo --config dpo.yaml
    accelerate launch --num_processes 8 -m rlhf.dpo --config dpo.yaml

No reward model and no sampling: the policy learns from the annotators' pairs directly (Rafailov et
al., 2023). The data is what `rlhf.train_rm` reads: a TRL export dir or file, a pairs JSONL (votes
aggregated with `--aggregate`), or a saved HF dataset; its test split gives the held-out figures.

The policy is any storypref family (ViT-GPT2, LLaVA, Qwen2-VL, Qwen2.5-VL). It gets a fresh LoRA
adapter, and the reference is the same weights with the adapter off, as in `rlhf.ppo`: a saved
policy dir or an `--sft_adapter` is merged first, so the reference is the SFT model. Each pair's
log-ratio is log π(story | frames, prompt) − log π_ref(story | frames, prompt), summed over the
story's tokens and its EOS.

Losses (`rlhf.losses.dpo_loss`): `sigmoid` (DPO), `ipo` (Azar et al., 2023), and conservative DPO
(`--label_smoothing ε`, for annotators who agree with each other about 1 − ε of the time;
storyworld's simulated ones, about 0.75). A tie trains toward equal log-ratios (a soft target of
½), and a soft vote share (`--aggregate soft`, from per-vote pairs or a TRL/HF export's
`agreement`) is its own target, as in the reward model: a 2-to-1 pair pulls toward ⅔, not 1 − ε;
`--skip_ties` leaves ties out.

Segment-level DPO (`--span_weight γ`): where annotators marked words (span marks), the rejected
story's marked tokens weigh γ in its log-ratio, so the loss pushes hardest on the words people said
are wrong, as RLHF-V's dense DPO does with corrected segments (Yu et al., 2024); the chosen story's
marked tokens weigh 0, so a flaw the winner shares is not reinforced. Unmarked pairs are plain DPO.

Contrast pairs (`--contrast_words FILE`): a `--contrast_share` of the decisive train pairs' chosen
stories also face themselves with one phrase of the file's word groups swapped (a color, shape,
object, setting), as POVID makes dispreferred answers by injecting hallucinations (Zhou et al.,
2024): pairs that only the frames, or the story's own other mentions, can settle. Train split only.

Every `--eval_steps` steps and at the end: the held-out loss, the implicit reward's accuracy (β·log-
ratio, chosen above rejected on decisive pairs) and the chosen/rejected margins. Logs go to
metrics.jsonl, TensorBoard and metrics.json; `checkpoint-last` is written every `--save_steps`
steps, and `--resume` continues from it exactly (the same data order, optimizer and schedule).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from annotate.formats import parse_prompt, plain_spans, plain_text
from rlhf import losses
from rlhf.data import DataError, PreferencePair, contrast_pairs, load_preferences, read_contrast_words
from rlhf.loading import ModelLoadError
from rlhf.policy import LoraSpec, StoryPolicy, load_policy
from rlhf.runlog import clip_gradients, device_summary, latest_checkpoint, log_metrics, prefer_safe_attention, restore_training_state, save_training_state


@dataclass
class DPOConfig:
    policy: str = field(metadata={"help": "the policy: HF id or path (ViT-GPT2, clip-prefix, LLaVA, Qwen2-VL, Qwen2.5-VL), or a dir from rlhf.sft"})
    data: str = field(default="", metadata={"help": "preference data, as rlhf.train_rm reads it: an annotate.export dir or file (TRL or pairs "
                                                    "JSONL), or a saved HF dataset"})  # fmt: skip
    output_dir: str = field(default="runs/dpo", metadata={"help": "adapter, checkpoints and logs"})
    sft_adapter: str | None = field(default=None, metadata={"help": "an SFT LoRA adapter to merge first (it becomes the reference)"})
    aggregate: str = field(default="majority", metadata={"help": "how votes on a comparison become a target: majority | soft | none (pairs "
                                                                  "JSONL); soft on a TRL/HF export reads each row's `agreement`"})  # fmt: skip
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) | ipo"})
    beta: float = field(default=0.1, metadata={"help": "β: how far from the reference the policy may move (higher: closer)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO's ε in [0, 0.5): the share of labels taken to be flipped"})
    span_weight: float = field(default=0.0, metadata={"help": "segment-level DPO from the data's span marks (annotate.export `spans`): in the "
                                                               "rejected story's log-ratio each marked token weighs γ (RLHF-V's dense DPO used "
                                                               "γ = 5), and the chosen story's marked tokens weigh 0 (flaws of the winner are "
                                                               "not reinforced); 0 = off (plain DPO: every token weighs 1)"})  # fmt: skip
    skip_ties: bool = field(default=False, metadata={"help": "leave tied pairs out (default: they pull the two log-ratios together)"})
    contrast_words: str | None = field(default=None, metadata={"help": "a file of word groups, one per line, comma-separated (colors, shapes, "
                                                                       "objects, settings): a --contrast_share of the decisive train pairs "
                                                                       "get a contrast pair, their chosen story against itself with one "
                                                                       "phrase swapped for another of its group (POVID-style hallucination "
                                                                       "negatives; see docs/training.md)"})  # fmt: skip
    contrast_share: float = field(default=0.5, metadata={"help": "with --contrast_words: the share of decisive train pairs that get one"})
    epochs: int = field(default=1, metadata={"help": "passes over the training pairs"})
    lr: float = field(default=5e-5, metadata={"help": "peak AdamW learning rate of the LoRA adapter"})
    batch_size: int = field(default=8, metadata={"help": "pairs per step and process"})
    grad_accum: int = field(default=1, metadata={"help": "steps accumulated per optimizer update"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the updates spent warming up (then linear decay to 0)"})
    max_length: int = field(default=256, metadata={"help": "story tokens kept per side (a longer story is cut, without its EOS)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    dtype: str | None = field(default=None, metadata={"help": "load dtype: float32 | bfloat16 | float16 | auto"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    eval_steps: int = field(default=0, metadata={"help": "held-out figures every N optimizer steps (0: at the end only)"})
    save_steps: int = field(default=50, metadata={"help": "write checkpoint-last every N optimizer steps (and at the end)"})
    logging_steps: int = field(default=10, metadata={"help": "log the training figures every N optimizer steps"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir/checkpoint-last"})
    stop_after: int | None = field(default=None, metadata={"help": "end this run after N optimizer steps (continue with --resume)"})
    seed: int = field(default=0, metadata={"help": "seed for the data order"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: what accelerate picks)"})
    train_pairs: int = field(default=0, init=False, metadata={"help": "(derived)"})
    eval_pairs: int = field(default=0, init=False, metadata={"help": "(derived)"})


def check_config(cfg: DPOConfig) -> None:
    if cfg.loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"--loss_type {cfg.loss_type!r}: use sigmoid or ipo")
    if cfg.beta <= 0:
        raise ValueError(f"--beta {cfg.beta}: give a positive number (0.1 is common for sigmoid, 0.5 for ipo)")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing {cfg.label_smoothing}: use a value in [0, 0.5)")
    if cfg.span_weight < 0:
        raise ValueError(f"--span_weight {cfg.span_weight}: give γ ≥ 0 (0 = off; RLHF-V used 5)")
    if cfg.contrast_words and not 0.0 < cfg.contrast_share <= 1.0:
        raise ValueError(f"--contrast_share {cfg.contrast_share}: use a value in (0, 1]")
    if not cfg.data:
        raise DataError("--data is required: an annotate.export dir or file (TRL or pairs JSONL) or a saved HF dataset")


def usable_pairs(pairs: list[PreferencePair], cfg: DPOConfig, where: str) -> list[PreferencePair]:
    """The pairs DPO learns from (ties out with --skip_ties); an error that names the pair or says why none is left."""
    for p in pairs:
        if not p.images:
            raise DataError(f"{p.where or where}: the pair has no images; a story policy learns stories of frames, so every pair needs its images")
    keep = [p for p in pairs if not (cfg.skip_ties and p.tie)]
    if not any(not p.tie for p in keep):
        raise DataError(f"{where}: no decisive pair to learn from ({len(pairs)} pairs, all ties); collect decisive votes")
    return keep


def span_token_weights(policy: StoryPolicy, pairs: list[PreferencePair], width: int, gamma: float) -> torch.Tensor:
    """(2B, width) weights of the chosen stories' tokens, then the rejected ones': 1, except γ on a
    rejected story's marked tokens and 0 on a chosen story's (see --span_weight); EOS weighs 1."""
    stories = [(p.chosen, p.spans.get("chosen", [])) for p in pairs] + [(p.rejected, p.spans.get("rejected", [])) for p in pairs]
    weights = torch.ones(len(stories), width)
    marked_rows = [k for k, (_, marks) in enumerate(stories) if marks]
    if not marked_rows:
        return weights
    offsets = policy.response_offsets([plain_text(stories[k][0]) for k in marked_rows])
    for k, token_spans in zip(marked_rows, offsets):
        story, marks = stories[k]
        value = gamma if k >= len(pairs) else 0.0
        for start, end in plain_spans(story, marks):
            for t, (a, b) in enumerate(token_spans[:width]):
                if b > a and a < end and start < b:
                    weights[k, t] = value
    return weights


def sequence_logprobs(model, policy: StoryPolicy, pairs: list[PreferencePair], max_length: int, reference: bool = False,
                      span_weight: float = 0.0):  # fmt: skip
    """(log π of the chosen stories (B,), of the rejected (B,), token counts (B,), (B,)); `reference`: adapter off, no grad.

    With `span_weight` γ > 0 each sum is weighted per token (`span_token_weights`): the segment-level DPO of --span_weight.
    """
    prompts = [parse_prompt(p.prompt) for p in pairs]
    frames = [[r.load() for r in p.images] for p in pairs] * 2
    batch = policy.batch(frames, [i for i, _, _ in prompts] * 2, [s for _, s, _ in prompts] * 2, [c for _, _, c in prompts] * 2)
    ids, mask = policy.tokenize_responses([plain_text(p.chosen) for p in pairs] + [plain_text(p.rejected) for p in pairs])
    ids, mask = ids[:, :max_length], mask[:, :max_length]
    if reference:
        with torch.no_grad(), policy.reference():
            logprobs = policy(batch, ids, mask).logprobs
    else:
        logprobs = model(batch, ids, mask).logprobs  # (2B, T), 0 where masked
    if span_weight:
        logprobs = logprobs * span_token_weights(policy, pairs, ids.shape[1], span_weight).to(logprobs.device, logprobs.dtype)
    total, tokens = logprobs.sum(1), mask.sum(1)
    b = len(pairs)
    return total[:b], total[b:], tokens[:b], tokens[b:]


def pair_loss(model, policy: StoryPolicy, pairs: list[PreferencePair], cfg: DPOConfig):
    chosen, rejected, n_chosen, n_rejected = sequence_logprobs(model, policy, pairs, cfg.max_length, span_weight=cfg.span_weight)
    ref_chosen, ref_rejected, _, _ = sequence_logprobs(model, policy, pairs, cfg.max_length, reference=True, span_weight=cfg.span_weight)
    target = torch.tensor([p.target for p in pairs], device=chosen.device)
    return losses.dpo_loss(chosen - ref_chosen, rejected - ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing, target,
                           n_chosen, n_rejected)  # fmt: skip


@torch.no_grad()
def evaluate(policy: StoryPolicy, pairs: list[PreferencePair], cfg: DPOConfig) -> dict[str, float]:
    """The held-out loss, implicit-reward accuracy (decisive pairs) and margins, weighted by batch size."""
    if not pairs:
        return {}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for k in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[k : k + cfg.batch_size]
        loss, stats = pair_loss(policy, policy, chunk, cfg)
        decisive = sum(not p.tie for p in chunk)
        for name, value, n in [("loss", loss.item(), len(chunk))] + [(n_, v.item(), decisive if n_ == "rewards/accuracies" else len(chunk))
                                                                      for n_, v in stats.items()]:  # fmt: skip
            if n and math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + value * n
                counts[name] = counts.get(name, 0) + n
    return {f"eval_{name.replace('/', '_')}": sums[name] / counts[name] for name in sums}


def train(cfg: DPOConfig) -> tuple[StoryPolicy, dict]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup
    from trl.trainer.utils import disable_dropout_in_model

    # 1. Everything that can be wrong is checked before any model work: settings, then data.
    check_config(cfg)
    train_all, test_all, message = load_preferences(cfg.data, cfg.aggregate)
    train_set = usable_pairs(train_all, cfg, cfg.data)
    if cfg.span_weight and not any(p.spans for p in train_set):
        raise DataError(f"{cfg.data}: --span_weight {cfg.span_weight} needs span marks, and no train pair has any. Export a project "
                        "whose annotators mark words (annotate.ingest --span-marks), or leave --span_weight at 0")  # fmt: skip
    eval_set = usable_pairs(test_all, cfg, cfg.data) if any(not p.tie for p in test_all) else []  # held-out figures need a decisive pair
    contrast = contrast_pairs(train_set, read_contrast_words(cfg.contrast_words), cfg.contrast_share, cfg.seed) if cfg.contrast_words else []
    if cfg.contrast_words and not contrast:
        raise DataError(f"{cfg.contrast_words}: no chosen story in {cfg.data} holds a phrase of these groups, so no contrast pair "
                        "was made; check the words against the stories")  # fmt: skip
    train_set += contrast  # train only: the held-out figures stay the annotators' pairs
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", gradient_accumulation_steps=cfg.grad_accum,
                              cpu=cfg.device == "cpu")  # fmt: skip
    prefer_safe_attention()
    set_seed(cfg.seed)
    log = accelerator.print
    out = Path(cfg.output_dir)
    ckpt = out / "checkpoint-last"
    cfg.train_pairs, cfg.eval_pairs = len(train_set), len(eval_set)
    per_rank = len(train_set) // accelerator.num_processes
    batches_per_epoch = per_rank // cfg.batch_size
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.data}: {len(train_set)} training pairs are fewer than one update of {cfg.batch_size} × {cfg.grad_accum} "
                        f"× {accelerator.num_processes} processes; lower --batch_size")  # fmt: skip

    # 2. The policy with a fresh adapter; the reference is the adapter off.
    policy = load_policy(cfg.policy, lora=LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha), sft_adapter=cfg.sft_adapter, dtype=cfg.dtype,
                         device=str(accelerator.device))  # fmt: skip
    disable_dropout_in_model(policy.model)  # the policy's and the reference's log-probs must be of the same network
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    params = policy.trainable_parameters()
    log(f"{message}\nDPO ({cfg.loss_type}, β {cfg.beta}) of {policy.family} {cfg.policy}: {sum(p.numel() for p in params):,} LoRA "
        f"parameters; {len(train_set)} train / {len(eval_set)} held-out pairs" + (f" ({len(contrast)} of them contrast pairs)" if contrast else ""))  # fmt: skip

    # 3. Optimizer, schedule, accelerate; resume.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    total = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer = accelerator.prepare(policy, optimizer)  # the schedule steps once per update on every process alike
    step = 0
    if cfg.resume:
        step = restore_training_state(ckpt, policy.model, optimizer, scheduler)["step"]
        log(f"resumed from {latest_checkpoint(ckpt)} at step {step}")
    writer = SummaryWriter(str(out / "tb")) if accelerator.is_main_process else None
    jsonl = out / "metrics.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "dpo_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        if not cfg.resume:
            jsonl.unlink(missing_ok=True)  # a fresh run starts a fresh log; --resume appends

    # 4. Train. The order of each epoch is a function of the seed and the epoch alone, so a resumed
    # run skips exactly the batches it had done.
    last = total if cfg.stop_after is None else min(total, step + cfg.stop_after)
    bar = tqdm(total=last, initial=step, desc="dpo", disable=not accelerator.is_main_process)
    window: dict[str, list[float]] = {}
    metrics: dict = {}
    t0 = time.perf_counter()
    policy.model.train()
    while step < last:
        epoch, done = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch)).tolist()
        order = order[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
        for b in range(done * cfg.grad_accum, steps_per_epoch * cfg.grad_accum):  # a last partial accumulation is left out
            chunk = [train_set[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            with accelerator.accumulate(model):
                loss, stats = pair_loss(model, policy, chunk, cfg)
                if not math.isfinite(loss.item()):
                    raise RuntimeError(f"the DPO loss became {loss.item()} at step {step}; lower --lr or raise --beta. "
                                       f"The last good checkpoint is {latest_checkpoint(ckpt)}")  # fmt: skip
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    stats["grad_norm"] = torch.tensor(clip_gradients(accelerator, params, cfg.max_grad_norm, f"rlhf.dpo step {step + 1}", ckpt))
                optimizer.step()
                optimizer.zero_grad()
            for name, value in {"loss": loss, **stats}.items():
                if math.isfinite(value.item()):
                    window.setdefault(name, []).append(value.item())
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            bar.update(1)
            if accelerator.is_main_process and (step % cfg.logging_steps == 0 or step == last):
                metrics = {f"dpo/{k}": sum(v) / len(v) for k, v in window.items()} | {"dpo/lr": lr, "dpo/epoch": step / steps_per_epoch}
                log_metrics(writer, jsonl, step, metrics)
                bar.set_postfix(loss=f"{metrics['dpo/loss']:.3f}", acc=f"{metrics.get('dpo/rewards/accuracies', float('nan')):.2f}")
                window = {}
            if accelerator.is_main_process and cfg.eval_steps and step % cfg.eval_steps == 0 and step != last:
                log_metrics(writer, jsonl, step, {f"dpo/{k}": v for k, v in evaluate(policy, eval_set, cfg).items()})
                policy.model.train()
            if accelerator.is_main_process and (step % cfg.save_steps == 0 or step == last):
                save_training_state(ckpt, policy.model, optimizer, scheduler, {"step": step})
            if step == last:
                break
    bar.close()
    accelerator.wait_for_everyone()

    # 5. The adapter (loadable with load_policy, and by rlhf.generate and rlhf.ppo), held-out figures, metrics.json.
    result: dict = {}
    if accelerator.is_main_process:
        policy.model.eval()
        policy.save_pretrained(out)
        held = evaluate(policy, eval_set, cfg)
        log_metrics(writer, jsonl, step, {f"dpo/{k}": v for k, v in held.items()})
        result = {**{k.removeprefix("dpo/"): v for k, v in metrics.items()}, **held, "steps": step, "train_pairs": len(train_set), "contrast_pairs": len(contrast),
                  "eval_pairs": len(eval_set), "family": policy.family, "world_size": accelerator.num_processes,
                  **device_summary(accelerator), "minutes": round((time.perf_counter() - t0) / 60, 2)}  # fmt: skip
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        if writer is not None:
            writer.close()
        log(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    return policy, result


def main(cfg: DPOConfig) -> dict:
    return train(cfg)[1]


def parse_args(argv: list[str] | None = None) -> DPOConfig:
    import argparse

    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[DPOConfig], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    from rlhf.policy import UnsupportedPolicyError

    try:
        main(parse_args())
    except (DataError, ModelLoadError, UnsupportedPolicyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
