"""PPO on a vision-language story policy, with LoRA, KL control and a composite reward.

    python -m rlhf.ppo --policy runs/sft --reward_model runs/rm --prompts world/items.jsonl --output_dir runs/ppo
    python -m rlhf.ppo --config ppo.yaml
    accelerate launch --num_processes 8 -m rlhf.ppo --config ppo.yaml        (DDP; FSDP or DeepSpeed configs too)

TRL 1.x has no PPO trainer, so this is our loop, following "The N Implementation Details of RLHF
with PPO" (Huang et al. 2022). Each iteration reads top to bottom:

1. rollout: sample stories for a batch of prompts (images + instruction + style + context);
2. score: the composite reward (`rlhf.rewards`), minus penalties where no EOS came or the story
   stops mid-sentence;
3. per-token KL against the reference in the reward, with the score at EOS;
4. GAE (γ, λ);
5. whiten the advantages;
6. PPO epochs over minibatches: clipped policy and value losses, gradient clipping, and an early
   stop of the epoch when the approximate KL to the rollout policy spikes;
7. log: `ppo/*`, `reward/*`, lengths; a sample table every `--sample_every` iterations.

With `--advantage grpo` or `rloo` (and `--samples_per_prompt K`), step 1 samples K stories per
prompt and steps 4-5 give each story one advantage from its prompt's other samples (GRPO's group
normalization, RLOO's leave-one-out baseline): no value head. `--kl_in loss` moves the KL from the
reward (step 3) into the loss as GRPO's k3 term.

The policy carries a fresh LoRA adapter; the reference is the same weights with the adapter off
(`policy.reference()`), so no second copy is held. An `--sft_adapter` is merged first, so the
reference is the SFT model. The value head is a linear layer on the policy's last hidden state,
trained alone for the first `--value_warmup_steps` iterations. Dropout is off everywhere, and
log-probs are taken at the sampling temperature.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rlhf import losses
from rlhf.clip import DEFAULT_CACHE
from rlhf.loading import ModelLoadError
from rlhf.policy import LoraSpec, PolicyBatch, StoryPolicy, load_policy
from rlhf.rewards import SIGNALS, CompositeReward, build_reward, ends_a_sentence, parse_weights
from rlhf.runlog import clip_gradients, device_summary, log_metrics, prefer_safe_attention, restore_training_state, save_training_state
from rlhf.stories import StoryDataError, StoryExample, read_examples


@dataclass
class PPOConfig:
    # Models.
    policy: str = field(metadata={"help": "the policy: HF id or path (ViT-GPT2, clip-prefix, LLaVA, Qwen2-VL), or a dir from rlhf.sft"})
    window: int = field(default=0, metadata={"help": "K: cut each story into next-frame examples (frames T-K..T, the text before T as context, frame T's text as the target); 0: whole stories"})
    prompts: str = field(default="", metadata={"help": "prompts: items JSONL (image_paths, instruction, style, context) or an HF dataset"})
    output_dir: str = field(default="runs/ppo", metadata={"help": "adapter, value head, checkpoints and logs"})
    sft_adapter: str | None = field(default=None, metadata={"help": "an SFT LoRA adapter to merge first (it becomes the reference)"})
    reward_model: str | None = field(default=None, metadata={"help": "reward model dir (rlhf.train_rm) for the `human` signal"})
    reward_weights: str = field(default="human=1,clip=0.3,coherence=0.2,repetition=0.1,style=0.2",
                                metadata={"help": f"signal=weight list; signals: {', '.join(SIGNALS)}"})  # fmt: skip
    clip_model: str | None = field(default="ViT-B-32", metadata={"help": "open_clip name or local dir for the `clip` signal"})
    clip_pretrained: str | None = field(default="laion2b_s34b_b79k", metadata={"help": "open_clip pretrained tag (ignored for a local dir)"})
    sentence_model: str | None = field(default="sentence-transformers/all-MiniLM-L6-v2", metadata={"help": "sentence encoder for coherence and style"})
    style_descriptions: str | None = field(default=None, metadata={"help": "JSON file {style: description} for the `style` signal"})
    # KL control.
    kl_coef: float = field(default=0.2, metadata={"help": "initial β of the per-token KL penalty"})
    adaptive_kl: bool = field(default=True, metadata={"help": "adapt β toward --kl_target (Ziegler et al. 2019); off: fixed β"})
    kl_target: float = field(default=6.0, metadata={"help": "target KL to the reference, in nats per story"})
    kl_horizon: int = field(default=10_000, metadata={"help": "adaptive controller horizon, in episodes: β moves by up to "
                                                               "20%% × episodes per iteration / horizon each iteration, so keep it well "
                                                               "below a short run's episode count"})  # fmt: skip
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator in the reward: k1 | k2 | k3"})
    kl_in: str = field(default="reward", metadata={"help": "where the KL to the reference acts: reward (β·KL per token subtracted from the "
                                                           "reward, --kl_estimator) | loss (β·k3 added to the policy loss, as GRPO does)"})  # fmt: skip
    # The advantage: GAE with a value head, or critic-free from several samples per prompt.
    advantage: str = field(default="gae", metadata={"help": "gae (a value head and GAE, PPO) | grpo (rewards normalized within each prompt's "
                                                            "samples, Shao et al. 2024) | rloo (each sample's reward minus the mean of its "
                                                            "prompt's other samples, Ahmadian et al. 2024); grpo and rloo train no value head"})  # fmt: skip
    samples_per_prompt: int = field(default=1, metadata={"help": "stories sampled per prompt in a rollout (K); grpo and rloo need 2 or "
                                                                 "more (4 is common); --rollout_batch_size must be a multiple of it"})  # fmt: skip
    # PPO.
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip ε"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    rollout_batch_size: int = field(default=32, metadata={"help": "stories sampled per iteration and process"})
    mini_batch_size: int = field(default=8, metadata={"help": "stories per gradient step"})
    iterations: int = field(default=50, metadata={"help": "PPO iterations (rollout + update)"})
    max_new_tokens: int = field(default=96, metadata={"help": "story length limit in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs are taken at it too)"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the score of a story without EOS"})
    unfinished_penalty: float = field(default=0.0, metadata={"help": "subtracted from the score of a story that ends mid-sentence "
                                                                     "(EOS after text with no closing . ! ? or quote): a truncation hack"})  # fmt: skip
    length_debias: float = field(default=0.0, metadata={"help": "take this share (0-1) of the reward's linear dependence on story length "
                                                                "out of each rollout batch (least squares over the batch; 1: none left), so "
                                                                "the policy cannot gain by writing shorter or longer alone; a setting to try "
                                                                "over a few seeds, not a known gain. Logged as reward/length_slope"})  # fmt: skip
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    kl_spike: float = field(default=0.5, metadata={"help": "stop an iteration's PPO epochs when approx-KL to the rollout policy exceeds this"})
    value_warmup_steps: int = field(default=2, metadata={"help": "iterations that train only the value head"})
    whiten_rewards: bool = field(default=False, metadata={"help": "also whiten the per-token rewards before GAE"})
    # LoRA and optimization.
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the PPO adapter"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (LoRA and value head)"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "learning-rate schedule over the iterations: linear (to 0 at the "
                                                                       "last iteration, as TRL's PPO did) | cosine | constant"})  # fmt: skip
    dtype: str | None = field(default=None, metadata={"help": "load dtype: float32 | bfloat16 | float16 | auto"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    # Bookkeeping.
    save_every: int = field(default=10, metadata={"help": "checkpoint every N iterations"})
    sample_every: int = field(default=5, metadata={"help": "log a sample table every M iterations"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir/checkpoint-last"})
    stop_after: int | None = field(default=None, metadata={"help": "end this run after N iterations (continue with --resume)"})
    seed: int = field(default=0, metadata={"help": "seed for the prompt order and sampling"})
    cache_dir: str | None = field(default=None, metadata={"help": "CLIP embedding cache (default: ~/.cache/storypref/clip)"})
    world_size: int = field(default=1, init=False, metadata={"help": "(derived)"})
    episodes_per_iteration: int = field(default=0, init=False, metadata={"help": "(derived)"})


class ValueHead(nn.Module):
    """V(s_t) from the policy's last hidden state: (B, T, C) → (B, T)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class PolicyAndValue(nn.Module):
    """One module for accelerate to wrap: (batch, ids, mask) → (log-probs, values, logits).

    Without a value head (GRPO, RLOO) the values are None.
    """

    def __init__(self, policy: StoryPolicy, value_head: ValueHead | None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, batch: PolicyBatch, ids: torch.Tensor, mask: torch.Tensor, temperature: float):
        out = self.policy(batch, ids, mask, temperature)
        return out.logprobs, None if self.value_head is None else self.value_head(out.hidden), out.logits


def check_prompts(cfg: PPOConfig) -> list[StoryExample]:
    if not cfg.prompts:
        raise StoryDataError("--prompts is required: an items JSONL (image_paths, instruction, style) or an HF dataset")
    return read_examples(cfg.prompts, window=cfg.window)


def sample_table(examples: list[StoryExample], texts: list[str], total: torch.Tensor, components: dict, n: int = 4) -> list[dict]:
    rows = []
    for i in range(min(n, len(texts))):
        rows.append({"images": [Path(str(p)).name for p in examples[i].images], "style": examples[i].style, "story": texts[i],
                     "reward": round(total[i].item(), 3), **{k: round(v[i].item(), 3) for k, v in components.items()}})  # fmt: skip
    return rows


def train(cfg: PPOConfig, reward: CompositeReward | None = None) -> tuple[StoryPolicy, dict]:
    """Run PPO as `cfg` says; returns the policy (LoRA adapter trained) and the final metrics.

    `reward`, from Python only: a CompositeReward of your own signals (any callable taking
    `(images, instructions, contexts, styles, stories)` and returning a (B,) tensor) instead of the one
    `--reward_weights` builds; `--reward_weights` and the reward-model flags are then not read.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_scheduler
    from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits

    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no")
    prefer_safe_attention()
    set_seed(cfg.seed)
    device = str(accelerator.device)
    out = Path(cfg.output_dir)
    ckpt = out / "checkpoint-last"
    log = accelerator.print

    # 0. Everything that can be wrong is checked before any compute: weights, prompts, models.
    weights = parse_weights(cfg.reward_weights) if reward is None else reward.weights
    if cfg.kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"--kl_estimator {cfg.kl_estimator!r}: use k1, k2 or k3")
    if cfg.lr_scheduler_type not in ("linear", "cosine", "constant"):
        raise ValueError(f"--lr_scheduler_type {cfg.lr_scheduler_type!r}: use linear, cosine or constant")
    if cfg.rollout_batch_size % cfg.mini_batch_size:
        raise ValueError(f"--rollout_batch_size {cfg.rollout_batch_size} must be a multiple of --mini_batch_size {cfg.mini_batch_size}")
    if cfg.advantage not in ("gae", "grpo", "rloo"):
        raise ValueError(f"--advantage {cfg.advantage!r}: use gae, grpo or rloo")
    if not 0.0 <= cfg.length_debias <= 1.0:
        raise ValueError(f"--length_debias {cfg.length_debias}: give a share in [0, 1] (0: off, 1: no linear length dependence left)")
    if cfg.kl_in not in ("reward", "loss"):
        raise ValueError(f"--kl_in {cfg.kl_in!r}: use reward or loss")
    if cfg.samples_per_prompt < 1 or cfg.rollout_batch_size % cfg.samples_per_prompt:
        raise ValueError(f"--samples_per_prompt {cfg.samples_per_prompt}: give 1 or more, dividing --rollout_batch_size {cfg.rollout_batch_size}")
    critic_free = cfg.advantage != "gae"
    if critic_free and cfg.samples_per_prompt < 2:
        raise ValueError(f"--advantage {cfg.advantage} compares several stories of the same prompt: set --samples_per_prompt to 2 or more "
                         f"(4 is common), not {cfg.samples_per_prompt}")  # fmt: skip
    prompts = check_prompts(cfg)
    if reward is None:
        descriptions = json.loads(Path(cfg.style_descriptions).read_text()) if cfg.style_descriptions else None
        reward = build_reward(weights, reward_model=cfg.reward_model, clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained,
                              sentence_model=cfg.sentence_model, style_descriptions=descriptions, device=device,
                              cache_dir=cfg.cache_dir or str(DEFAULT_CACHE))  # fmt: skip
    policy = load_policy(cfg.policy, lora=LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha), sft_adapter=cfg.sft_adapter,
                         dtype=cfg.dtype, device=device)  # fmt: skip
    disable_dropout_in_model(policy.model)  # dropout off: rollout and update log-probs must agree
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    value_head = None if critic_free else ValueHead(policy.hidden_size).to(device)
    model = PolicyAndValue(policy, value_head)
    cfg.world_size = accelerator.num_processes
    cfg.episodes_per_iteration = cfg.rollout_batch_size * cfg.world_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=1e-5, weight_decay=0.0)  # no decay: frozen-by-warm-up LoRA must not drift
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    # Stepped once per iteration on every process alike, so not handed to accelerate (which would step it per process).
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=cfg.iterations)
    kl_ctl = losses.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else losses.FixedKLController(cfg.kl_coef)
    start = 0
    if cfg.resume:
        saved = restore_training_state(ckpt, model, optimizer, scheduler)
        kl_ctl.value = saved["kl_coef"]
        reward.load_state_dict(saved["reward_stats"])
        start, found = saved["iteration"], saved["found"]
        log(f"resumed from {found} at iteration {start}")
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(out / "tb"))
        (out / "ppo_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    jsonl = out / "metrics.jsonl"
    if not cfg.resume and accelerator.is_main_process:
        jsonl.unlink(missing_ok=True)  # a fresh run starts fresh logs; --resume appends
        (out / "samples.jsonl").unlink(missing_ok=True)
    log(f"PPO ({cfg.advantage} advantages) on {policy.family} {cfg.policy}: {sum(p.numel() for p in params):,} trainable parameters "
        f"(LoRA{'' if critic_free else ' + value head'}); signals {weights}; {len(prompts)} prompts")  # fmt: skip

    last = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    bar = tqdm(range(start, last), desc="ppo", disable=not accelerator.is_main_process)
    metrics: dict = {}
    t0 = time.perf_counter()
    for iteration in bar:
        # 1. Rollout: a seeded prompt batch per (iteration, process), sampled with the current policy.
        rng = random.Random(f"{cfg.seed}:{iteration}:{accelerator.process_index}")
        group = cfg.samples_per_prompt  # each prompt's K samples next to each other
        chunk = [p for p in (prompts[rng.randrange(len(prompts))] for _ in range(cfg.rollout_batch_size // group)) for _ in range(group)]
        t_start = time.perf_counter()
        batch = policy.examples_batch(chunk)
        gen = policy.generate(batch, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        ids, mask = gen.response_ids, gen.response_mask  # (B, T)

        # 2. Score: the composite reward, and a penalty for a story that never ended.
        t_generated = time.perf_counter()
        with torch.no_grad():
            scores, components = reward([e.images for e in chunk], [e.instruction for e in chunk], [e.context for e in chunk],
                                        [e.style for e in chunk], gen.texts)  # fmt: skip
            unfinished = torch.tensor([bool(e) and not ends_a_sentence(t) for e, t in zip(gen.ended.tolist(), gen.texts)], device=device)
            penalty = cfg.missing_eos_penalty * (~gen.ended).float().to(device) + cfg.unfinished_penalty * unfinished.float()
            # Before the penalties (a story that never ended is still penalized in full); the slope is logged either way.
            scores, slope = losses.length_debiased(scores.to(device), mask.sum(1), cfg.length_debias)
            scores = scores - penalty

            # 3. Per-token KL in the reward: old log-probs and values, and the reference (adapter off).
            t_scored = time.perf_counter()
            old_logprobs, old_values, _ = wrapped(batch, ids, mask, cfg.temperature)
            with policy.reference():
                ref_logprobs = policy(batch, ids, mask, cfg.temperature).logprobs
            in_reward = kl_ctl.value if cfg.kl_in == "reward" else 0.0
            rewards, kl = losses.kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, in_reward, cfg.kl_estimator)
            if cfg.whiten_rewards:
                rewards = losses.masked_whiten(rewards, mask, shift_mean=False)

            # 4-5. GAE and whitened advantages; or one advantage per story from its prompt's other samples.
            if critic_free:  # the story's return (score − β·KL when the KL is in the reward) against its group
                advantages = losses.group_advantages(rewards.sum(1), group, cfg.advantage).to(mask.device)[:, None] * mask
                returns = None
            else:
                advantages, returns = losses.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                advantages = losses.masked_whiten(advantages, mask)

        # 6. PPO epochs over minibatches; value head only during the warm-up.
        t_update = time.perf_counter()
        warmup = iteration < cfg.value_warmup_steps and not critic_free
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "vf_clipfrac", "ratio",
                                                         "kl_loss", "grad_norm")}  # fmt: skip
        stopped_early = False
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.rollout_batch_size, generator=torch.Generator().manual_seed(rng.randrange(2**31))).tolist()
            for k in range(0, cfg.rollout_batch_size, cfg.mini_batch_size):
                rows = order[k : k + cfg.mini_batch_size]
                mb_mask = mask[rows]
                width = int(mb_mask.sum(1).max())  # drop the all-padding tail of this minibatch
                mb_ids, mb_mask = ids[rows, :width], mb_mask[:, :width]
                logprobs, values, logits = wrapped(batch.select(rows), mb_ids, mb_mask, cfg.temperature)
                pg_loss, pg_stats = losses.ppo_policy_loss(logprobs, old_logprobs[rows, :width], advantages[rows, :width], mb_mask, cfg.cliprange)
                loss = (0.0 if warmup else 1.0) * pg_loss
                if values is not None:  # every parameter in the graph, for DDP
                    vf_loss, vf_stats = losses.ppo_value_loss(values, old_values[rows, :width], returns[rows, :width], mb_mask, cfg.cliprange_value)
                    loss = loss + cfg.vf_coef * vf_loss
                    pg_stats |= {"value_loss": vf_loss, **vf_stats}
                if cfg.kl_in == "loss":  # GRPO's k3 estimate of KL(π ‖ π_ref), in the loss
                    kl_loss = losses.masked_mean(losses.kl_estimate(logprobs, ref_logprobs[rows, :width], "k3"), mb_mask)
                    loss = loss + kl_ctl.value * kl_loss
                    pg_stats["kl_loss"] = kl_loss
                accelerator.backward(loss)
                pg_stats["grad_norm"] = clip_gradients(accelerator, params, cfg.max_grad_norm, f"rlhf.ppo iteration {iteration + 1}", ckpt)
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    entropy = losses.masked_mean(entropy_from_logits(logits.float()), mb_mask)
                for name, value in {"policy_loss": pg_loss, "entropy": entropy, **pg_stats}.items():
                    stats[name].append(value.detach().item() if isinstance(value, torch.Tensor) else float(value))
            approx_kl = accelerator.reduce(torch.tensor(stats["approx_kl"][-1], device=device), "mean").item()
            if not warmup and approx_kl > cfg.kl_spike:  # the policy moved too far from the rollout policy: stop this update
                stopped_early = True
                break

        # 7. Log, adapt β, checkpoint.
        t_end = time.perf_counter()
        mean_kl = accelerator.reduce(kl.sum(1).mean().to(device), "mean").item()  # nats per story
        kl_ctl.update(mean_kl, cfg.episodes_per_iteration)
        lr = scheduler.get_last_lr()[0]  # the rate this iteration's update used
        scheduler.step()
        metrics = {f"ppo/{k}": sum(v) / len(v) for k, v in stats.items() if v}
        metrics |= {
            "ppo/kl": mean_kl,
            "ppo/kl_coef": kl_ctl.value,
            "ppo/lr": lr,
            "ppo/early_stop": float(stopped_early),
            "ppo/value_warmup": float(warmup),
            "reward/total": scores.mean().item(),
            "reward/score": (scores + penalty).mean().item(),
            "reward/missing_eos": (~gen.ended).float().mean().item(),
            "reward/unfinished": unfinished.float().mean().item(),
            "reward/length_slope": slope.item(),  # the composite's change per token over the batch (before --length_debias takes it out)
            "response/length": mask.sum(1).float().mean().item(),
            "time/minutes": (time.perf_counter() - t0) / 60,
            # This iteration's seconds in each phase (this process): where a run's time goes.
            "time/generate_s": t_generated - t_start,
            "time/score_s": t_scored - t_generated,
            "time/kl_gae_s": t_update - t_scored,
            "time/update_s": t_end - t_update,
        }
        if not critic_free:
            metrics["ppo/explained_variance"] = losses.explained_variance(old_values, returns, mask).item()
        metrics |= {f"reward/{k}": v.mean().item() for k, v in components.items()}
        metrics |= {f"time/score_{k}_s": v for k, v in reward.seconds.items()}
        if accelerator.is_main_process:
            log_metrics(writer, jsonl, iteration + 1, metrics)
            bar.set_postfix(reward=f"{metrics['reward/total']:.2f}", kl=f"{mean_kl:.2f}")
            if (iteration + 1) % cfg.sample_every == 0:
                table = sample_table(chunk, gen.texts, scores, components)
                with (out / "samples.jsonl").open("a") as f:
                    f.write(json.dumps({"iteration": iteration + 1, "samples": table}) + "\n")
                header = "| images | story | " + " | ".join(k for k in table[0] if k not in ("images", "story")) + " |"
                lines = [header, "|" + " --- |" * (header.count("|") - 1)]
                lines += ["| " + ", ".join(r["images"]) + " | " + r["story"].replace("|", "/") + " | "
                          + " | ".join(str(v) for k, v in r.items() if k not in ("images", "story")) + " |" for r in table]  # fmt: skip
                writer.add_text("samples", "\n".join(lines), iteration + 1)
            if (iteration + 1) % cfg.save_every == 0 or iteration + 1 == last:
                save_training_state(ckpt, model, optimizer, scheduler, {"kl_coef": kl_ctl.value, "reward_stats": reward.state_dict(), "iteration": iteration + 1})
        accelerator.wait_for_everyone()

    # 8. Save the adapter (loadable with load_policy), the value head and the final metrics.
    result: dict = {}
    if accelerator.is_main_process:
        policy.save_pretrained(out)
        if value_head is not None:
            torch.save(value_head.state_dict(), out / "value_head.pt")
        result = {**metrics, "iterations": last, "episodes": last * cfg.episodes_per_iteration, "world_size": cfg.world_size, **device_summary(accelerator)}
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        if writer is not None:
            writer.close()
    accelerator.wait_for_everyone()
    return policy, result


def main(cfg: PPOConfig) -> dict:
    return train(cfg)[1]


def parse_args(argv: list[str] | None = None) -> PPOConfig:
    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[PPOConfig], description=__doc__.split("\n\n")[0]).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except (StoryDataError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
