"""Supervised fine-tuning of a story policy on (images, instruction, story) examples.

    python -m rlhf.sft --data world/sft.jsonl --policy Qwen/Qwen2-VL-2B-Instruct --output_dir runs/sft   (LoRA)
    python -m rlhf.sft --data world/sft.jsonl --init tiny-vit-gpt2 --output_dir runs/sft               (from scratch)
    accelerate launch --num_processes 8 -m rlhf.sft --data ... --policy ...

The data is a JSONL of `image_paths, instruction, [style, context,] story` (storyworld's
`sft.jsonl`), or a StoryReasoning-style HF dataset. The loss is the mean token NLL of the story and
its EOS given the images and the prompt. With `--lora` (the default for a pretrained `--policy`)
only a LoRA adapter trains and the output dir holds the adapter: pass it to PPO as
`--sft_adapter`. `--init tiny-vit-gpt2` builds a small ViT-GPT2 from scratch with a word-level
tokenizer on the data's own vocabulary and trains all of it: storyworld's starting policy, fluent in
a few CPU minutes. `--init tiny-clip-prefix --clip_model DIR` builds the clip-prefix family the same
way (a frozen CLIP, a new mapper, a small GPT-2); `--init clip-prefix --clip_model ViT-B-32
--clip_pretrained laion2b_s34b_b79k --language_model gpt2` puts a new mapper in front of a real
GPT-2. Each epoch ends with a held-out loss and a checkpoint (`--resume` continues),
and the run ends with sample stories (`samples.jsonl`) and `metrics.json`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from annotate.formats import format_prompt
from rlhf.loading import ModelLoadError
from rlhf.policy import STORY_CUE, LoraSpec, StoryPolicy, load_policy
from rlhf.runlog import clip_gradients, device_summary, log_metrics, prefer_safe_attention, restore_training_state, save_training_state
from rlhf.stories import StoryDataError, StoryExample, read_examples

INITS = ("tiny-vit-gpt2", "tiny-clip-prefix", "clip-prefix")


@dataclass
class SFTConfig:
    data: str = field(metadata={"help": "JSONL of image_paths, instruction, [style, context,] story; or an HF dataset (StoryReasoning schema)"})
    window: int = field(default=0, metadata={"help": "K: cut each story into next-frame examples (frames T-K..T, the text before T as context, frame T's text as the target); 0: whole stories"})
    output_dir: str = field(default="runs/sft", metadata={"help": "where the policy (adapter or full model), checkpoints and logs go"})
    policy: str | None = field(default=None, metadata={"help": "a policy to fine-tune: HF id or path (ViT-GPT2, clip-prefix, LLaVA, Qwen2-VL, Qwen2.5-VL)"})
    init: str | None = field(default=None, metadata={"help": "instead of --policy, build a fresh model: tiny-vit-gpt2 or tiny-clip-prefix (word-level, from scratch), or clip-prefix (a new mapper between --clip_model and the GPT-2 --language_model)"})
    lora: bool | None = field(default=None, metadata={"help": "train a LoRA adapter (default: on for --policy, off for --init)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    epochs: int = field(default=3, metadata={"help": "passes over the training examples"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: 2e-4 with LoRA, 1e-3 for --init)"})
    batch_size: int = field(default=16, metadata={"help": "examples per step and process"})
    grad_accum: int = field(default=1, metadata={"help": "steps accumulated per optimizer update"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the updates spent warming up"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of the examples held out for the eval loss and samples"})
    samples: int = field(default=16, metadata={"help": "held-out examples to write sample stories for at the end"})
    max_new_tokens: int = field(default=160, metadata={"help": "sample length limit"})
    image_size: int = field(default=64, metadata={"help": "--init: the ViT input size (a --vision_encoder brings its own)"})
    vision_encoder: str | None = field(default=None, metadata={"help": "--init: start from this pretrained ViT (HF id or path, e.g. google/vit-base-patch16-224-in21k, or storyworld train-vit's output) instead of a random one"})
    clip_model: str | None = field(default=None, metadata={"help": "--init tiny-clip-prefix / clip-prefix: the frozen CLIP it reads (open_clip name such as ViT-B-32, or a local dir such as storyworld train-clip's output)"})
    clip_pretrained: str | None = field(default=None, metadata={"help": "--init clip-prefix: open_clip weights tag for a named --clip_model (e.g. laion2b_s34b_b79k)"})
    language_model: str | None = field(default=None, metadata={"help": "--init clip-prefix: the GPT-2 to start from (any GPT2LMHeadModel, HF id or path, e.g. gpt2)"})
    prefix_length: int = field(default=4, metadata={"help": "--init tiny-clip-prefix / clip-prefix: prefix vectors per frame and for the context"})
    dtype: str | None = field(default=None, metadata={"help": "load dtype: float32 | bfloat16 | float16 | auto"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (GPUs that support it)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (non-reentrant, peft-safe)"})
    seed: int = field(default=0, metadata={"help": "seed for the split, the data order and initialization"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir/checkpoint-last"})
    stop_after_epochs: int | None = field(default=None, metadata={"help": "end this run after so many epochs (continue later with --resume)"})
    logging_steps: int = field(default=10, metadata={"help": "log every N optimizer steps"})
    train_examples: int = field(default=0, init=False, metadata={"help": "(derived)"})
    eval_examples: int = field(default=0, init=False, metadata={"help": "(derived)"})
    steps_per_epoch: int = field(default=0, init=False, metadata={"help": "(derived)"})


# ------------------------------------------------------------------------------------------------
# tiny-vit-gpt2: storyworld's starting policy, built from scratch.
# ------------------------------------------------------------------------------------------------


def word_tokenizer(texts: list[str], out_dir: Path):
    """A word-level tokenizer over `texts`: words and punctuation are tokens, spaces are restored on decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def build_tiny_vit_gpt2(examples: list[StoryExample], out_dir: Path, image_size: int = 64, seed: int = 0,
                        vision_encoder: str | None = None) -> Path:  # fmt: skip
    """A ~1.3M-parameter ViT-GPT2 VisionEncoderDecoder (storyworld: 0.45M in the ViT) with a tokenizer on the examples' own words.

    The ViT is random, or `vision_encoder`'s pretrained weights (and image processor), as the real
    ViT-GPT2 starts from an ImageNet ViT; the GPT-2 decoder is always new, for the new vocabulary.
    """
    from transformers import AutoImageProcessor, AutoModel, GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = [format_prompt(e.instruction, e.style, e.context) + "\n" + STORY_CUE + " " + (e.story or "") for e in examples]
    tokenizer = word_tokenizer(texts, out_dir)
    longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
    pretrained = None
    if vision_encoder:
        try:
            pretrained = AutoModel.from_pretrained(vision_encoder)
            processor = AutoImageProcessor.from_pretrained(vision_encoder)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"--vision_encoder {vision_encoder!r}: cannot load a vision model and its image processor there "
                                 f"(a hub id, or a directory with config.json and preprocessor_config.json): {str(e)[:200]}") from None  # fmt: skip
        if not hasattr(pretrained.config, "image_size"):
            raise ModelLoadError(f"--vision_encoder {vision_encoder}: a {type(pretrained).__name__} is not a vision encoder; pass a ViT")
        processor.save_pretrained(out_dir)
        encoder = pretrained.config
    else:
        ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
        # storyworld.vision.VIT_CONFIG pretrains this same size (a test keeps them equal).
        encoder = ViTConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                            image_size=image_size, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    decoder = GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=3, n_head=4, n_positions=max(256, 2 * longest),
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    model = VisionEncoderDecoderModel(config=config)
    if pretrained is not None:
        missing, _ = model.encoder.load_state_dict(pretrained.state_dict(), strict=False)  # a pooler either side may lack
        if [k for k in missing if not k.startswith("pooler.")]:
            raise ModelLoadError(f"--vision_encoder {vision_encoder}: its weights do not fit the encoder (missing {missing[:3]})")
    model.save_pretrained(out_dir)
    return out_dir


def build_clip_prefix(examples: list[StoryExample], out_dir: Path, clip_model: str, clip_pretrained: str | None = None,
                      language_model: str | None = None, prefix_length: int = 4, seed: int = 0) -> Path:  # fmt: skip
    """A clip-prefix model (`rlhf.clip_prefix`): a new mapper between the frozen `clip_model` and GPT-2.

    GPT-2 is `language_model`'s (weights and tokenizer), or without one a new 3-layer, 128-wide
    GPT-2 over a word-level tokenizer on the examples' own words (`tiny-clip-prefix`: storyworld's).
    The mapper reads up to the longest example's frame count (at least 8).
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf.clip import ClipFeatures
    from rlhf.clip_prefix import ClipPrefixModel, build_config
    from rlhf.loading import load_pretrained, local_path

    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip = ClipFeatures(clip_model, clip_pretrained)  # fails early, naming what to pass, if the CLIP cannot load
    texts = [format_prompt(e.instruction, e.style, e.context) + "\n" + STORY_CUE + " " + (e.story or "") for e in examples]
    if language_model:
        gpt = load_pretrained(GPT2LMHeadModel, language_model, "--language_model (a GPT-2)")
        tokenizer = load_pretrained(AutoTokenizer, language_model, "tokenizer of --language_model")
        tokenizer.save_pretrained(out_dir)
        text = gpt.config
    else:
        gpt, tokenizer = None, word_tokenizer(texts, out_dir)
        longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
        text = GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=3, n_head=4, n_positions=max(256, 2 * longest),
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    name = local_path(clip_model) if Path(clip_model).is_dir() else clip_model  # absolute: the policy loads from any cwd
    config = build_config(name, None if Path(clip_model).is_dir() else clip_pretrained, clip.dim, text, prefix_length=prefix_length,
                          max_frames=max(8, max(len(e.images) for e in examples)))  # fmt: skip
    model = ClipPrefixModel(config)
    if gpt is not None:
        model.gpt.load_state_dict(gpt.state_dict())
    model.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------
# Training helpers.
# ------------------------------------------------------------------------------------------------


def split_examples(examples: list[StoryExample], fraction: float, seed: int) -> tuple[list[StoryExample], list[StoryExample]]:
    """A seeded held-out share, by item (by story for next-frame windows), so that no item or story
    lands on both sides."""
    ids = sorted({e.group for e in examples})
    random.Random(seed).shuffle(ids)
    held = set(ids[: max(1, round(fraction * len(ids)))]) if fraction > 0 and len(ids) > 1 else set()
    return [e for e in examples if e.group not in held], [e for e in examples if e.group in held]


def nll(model, policy: StoryPolicy, chunk: list[StoryExample]) -> torch.Tensor:
    """Mean token NLL of the stories (and their EOS) given images and prompts; `model` may be DDP-wrapped."""
    batch = policy.examples_batch(chunk)
    ids, mask = policy.tokenize_responses([e.story for e in chunk])
    logprobs = model(batch, ids, mask).logprobs  # (B, T)
    return -(logprobs * mask).sum() / mask.sum()


@torch.no_grad()
def eval_loss(policy: StoryPolicy, examples: list[StoryExample], batch_size: int) -> float:
    if not examples:
        return float("nan")
    policy.model.eval()
    total, n = 0.0, 0
    for k in range(0, len(examples), batch_size):
        chunk = examples[k : k + batch_size]
        total += nll(policy, policy, chunk).item() * len(chunk)
        n += len(chunk)
    return total / n


@torch.no_grad()
def sample_stories(policy: StoryPolicy, examples: list[StoryExample], max_new_tokens: int, batch_size: int = 16) -> list[dict]:
    """Greedy stories for `examples` (deterministic, for reading and for before/after comparisons)."""
    rows = []
    for k in range(0, len(examples), batch_size):
        chunk = examples[k : k + batch_size]
        batch = policy.examples_batch(chunk)
        out = policy.generate(batch, max_new_tokens=max_new_tokens, do_sample=False)
        rows += [{"item_id": e.item_id, "style": e.style, "story": text, "reference": e.story} for e, text in zip(chunk, out.texts)]
    return rows


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------


def train(cfg: SFTConfig) -> tuple[StoryPolicy, dict]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", gradient_accumulation_steps=cfg.grad_accum)
    prefer_safe_attention()
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    ckpt = out / "checkpoint-last"
    log = accelerator.print

    # 1. Data, checked before any model work; a held-out share by item.
    if (cfg.policy is None) == (cfg.init is None):
        raise ModelLoadError(f"pass exactly one of --policy (a model to fine-tune) and --init ({', '.join(INITS)})")
    if cfg.init is not None and cfg.init not in INITS:
        raise ModelLoadError(f"--init {cfg.init!r}: choose one of {', '.join(INITS)}")
    if cfg.vision_encoder and cfg.init != "tiny-vit-gpt2":
        raise ModelLoadError("--vision_encoder sets the ViT of a fresh --init model (tiny-vit-gpt2); other policies bring their own vision encoder")
    if cfg.init in ("tiny-clip-prefix", "clip-prefix") and not cfg.clip_model:
        raise ModelLoadError(f"--init {cfg.init} needs --clip_model: an open_clip name (ViT-B-32 with --clip_pretrained) or a local "
                             "directory (storyworld: python -m storyworld train-clip --world DIR --out DIR)")  # fmt: skip
    if (cfg.init == "clip-prefix") != bool(cfg.language_model):
        raise ModelLoadError("--language_model (a GPT-2) goes with --init clip-prefix, and --init clip-prefix needs one; "
                             "--init tiny-clip-prefix builds its own small GPT-2")  # fmt: skip
    examples = read_examples(cfg.data, need_story=True, window=cfg.window)
    train_set, eval_set = split_examples(examples, cfg.eval_fraction, cfg.seed)
    cfg.train_examples, cfg.eval_examples = len(train_set), len(eval_set)
    cfg.steps_per_epoch = len(train_set) // (accelerator.num_processes * cfg.batch_size) // cfg.grad_accum
    if cfg.steps_per_epoch == 0:
        raise StoryDataError(f"{cfg.data}: {len(train_set)} training examples are fewer than one update; lower --batch_size")

    # 2. The policy: a pretrained one (LoRA by default) or a fresh --init model (fully trained by default).
    if cfg.init is not None:
        base_dir = out / "init"
        if accelerator.is_main_process and not (base_dir / "config.json").exists():
            if cfg.init == "tiny-vit-gpt2":
                build_tiny_vit_gpt2(examples, base_dir, cfg.image_size, cfg.seed, cfg.vision_encoder)
            else:
                build_clip_prefix(examples, base_dir, cfg.clip_model, cfg.clip_pretrained, cfg.language_model, cfg.prefix_length, cfg.seed)
        accelerator.wait_for_everyone()
        base = str(base_dir)
    else:
        base = cfg.policy
    use_lora = cfg.lora if cfg.lora is not None else cfg.init is None
    lr = cfg.lr or (2e-4 if use_lora else 1e-3)
    policy = load_policy(base, lora=LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha) if use_lora else None, dtype=cfg.dtype,
                         device=str(accelerator.device))  # fmt: skip
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    params = policy.trainable_parameters()
    log(f"{policy.family} policy from {base}: {sum(p.numel() for p in params):,} trainable parameters "
        f"({'LoRA' if use_lora else 'full'}); {len(train_set)} train / {len(eval_set)} held-out examples")  # fmt: skip

    # 3. Optimizer, schedule, accelerate; resume.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = cfg.steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    start_epoch, step = 0, 0
    if cfg.resume:
        state = restore_training_state(ckpt, policy.model, optimizer, scheduler)
        start_epoch, step = state["epoch"] + 1, state["step"]
        log(f"resumed from {state['found']}: epoch {start_epoch}, step {step}")
    writer = SummaryWriter(str(out / "tb")) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    jsonl = out / "metrics.jsonl"
    if not cfg.resume and accelerator.is_main_process:
        jsonl.unlink(missing_ok=True)  # a fresh run starts a fresh log; --resume appends

    # 4. Train: a seeded order per epoch, sharded; held-out loss and a checkpoint after each epoch.
    t_start, metrics, window = time.perf_counter(), {}, []
    last_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch)).tolist()
        per_rank = len(order) // accelerator.num_processes
        order = order[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
        policy.model.train()
        n_batches = cfg.steps_per_epoch * cfg.grad_accum
        bar = tqdm(range(n_batches), desc=f"sft epoch {epoch + 1}/{cfg.epochs}", disable=not accelerator.is_main_process)
        for b in bar:
            chunk = [train_set[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            with accelerator.accumulate(model):
                loss = nll(model, policy, chunk)
                if not math.isfinite(loss.item()):
                    raise RuntimeError(f"loss became {loss.item()} at step {step}; lower --lr. The last good checkpoint is {ckpt}")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    clip_gradients(accelerator, params, cfg.max_grad_norm, f"rlhf.sft step {step + 1}", ckpt)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(loss.item())
            if accelerator.sync_gradients:
                step += 1
                if step % cfg.logging_steps == 0 and accelerator.is_main_process:
                    m = {"sft/loss": sum(window) / len(window), "sft/lr": scheduler.get_last_lr()[0], "sft/epoch": epoch + b / n_batches}
                    log_metrics(writer, jsonl, step, m)
                    bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
                    window = []
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            metrics = {"eval_loss": eval_loss(policy, eval_set, cfg.batch_size), "epoch": epoch + 1}
            log_metrics(writer, jsonl, step, {f"sft/{k}": v for k, v in metrics.items()})
            log(f"epoch {epoch + 1}: held-out loss {metrics['eval_loss']:.4f}")
            save_training_state(ckpt, policy.model, optimizer, scheduler, {"epoch": epoch, "step": step})
        accelerator.wait_for_everyone()

    # 5. Save the policy, samples and the final metrics.
    result: dict = {}
    if accelerator.is_main_process:
        policy.model.eval()
        policy.save_pretrained(out)
        samples = sample_stories(policy, eval_set[: cfg.samples], cfg.max_new_tokens)
        with (out / "samples.jsonl").open("w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        result = {
            "eval_loss": metrics.get("eval_loss", eval_loss(policy, eval_set, cfg.batch_size)),
            "train_examples": len(train_set),
            "eval_examples": len(eval_set),
            "family": policy.family,
            "lora": use_lora,
            "trainable_parameters": sum(p.numel() for p in params),
            "minutes": round((time.perf_counter() - t_start) / 60, 2),
            "steps": step,
            **device_summary(accelerator),
        }
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        if writer is not None:
            writer.close()
        log(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    return policy, result


def main(cfg: SFTConfig) -> dict:
    return train(cfg)[1]


def parse_args(argv: list[str] | None = None) -> SFTConfig:
    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[SFTConfig], description=__doc__.split("\n\n")[0]).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except (StoryDataError, ModelLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
