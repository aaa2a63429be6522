"""Benchmark: PPO's memory (adapter-off reference vs a reference copy) and speed (vs TRL's RLOOTrainer).

    python bench/ppo_memory_speed.py [--rounds 3] [--out bench/out/ppo-memory-speed.json]

1. **Memory.** A ~100M-parameter ViT-GPT2 policy (random weights, built here) with LoRA r=16 and a
   value head runs one PPO iteration (rollout, reference log-probs, values, one clipped update) two
   ways, each in a fresh process, with the same settings (16 stories of 32 tokens, minibatches of 4,
   gradient checkpointing): ours, where the reference is the same model with the adapter
   switched off, and the classic set-up that holds a separate frozen reference copy. Peak memory is
   `torch.cuda.max_memory_allocated` on a GPU. On the CPU it is the process's peak RSS (VmHWM, reset
   once the models are loaded, so the loader's transient copies do not count) minus its RSS after
   the imports: the weights, optimizer state and activations of the iteration. It is measured twice:
   with glibc's mmap threshold fixed at 128 KiB, so that freed tensors go back to the OS and RSS
   follows the live tensors (the analogue of max_memory_allocated, and the headline figure), and
   with glibc's default, whose freed-but-kept blocks also count (the analogue of reserved memory).
   Target: ours ≤ 0.6×.
2. **Speed.** One PPO iteration of `rlhf.ppo` against one step of TRL's `RLOOTrainer` on the same
   tiny Qwen2-VL, with the same prompts and images, the same batch (16 stories: 4 prompts × 4
   samples for RLOO), the same generation length (forced: no EOS is sampled) and the same reward
   function (distinct-2). Samples per second over the timed iterations (the first is a warm-up),
   alternating for `--rounds`. Target: ≥ 1.0×.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GEN_TOKENS = 32
BATCH = 16
MINI_BATCH = 4


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------------------------
# 1. Memory, one set-up per process.
# ------------------------------------------------------------------------------------------------


def build_100m(out: Path) -> int:
    """ViT (4 × 256) + GPT-2 (10 × 768, cross-attention): ~100M parameters, random, saved to `out`."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

    from tests.fixtures.make_tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(out)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)
    enc = ViTConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, image_size=64, patch_size=8)
    dec = GPT2Config(vocab_size=len(tokenizer), n_embd=768, n_layer=10, n_head=12, n_positions=256, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    model = VisionEncoderDecoderModel(config=config)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def measure_memory(model_dir: str, mode: str) -> dict:
    """Peak memory of one PPO iteration with the reference as `mode`: "adapter-off" or "copy"."""
    import copy

    import peft  # noqa: F401  (every library imported before the baseline, so that it counts model memory only)
    import torch
    import transformers.generation.utils  # noqa: F401
    from PIL import Image
    from transformers import GPT2LMHeadModel, VisionEncoderDecoderModel, ViTModel  # noqa: F401

    from rlhf import losses
    from rlhf.policy import LORA_TARGETS, load_policy
    from rlhf.ppo import ValueHead

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    Image.new("RGB", (8, 8)).resize((4, 4))
    baseline = rss_kib("VmRSS")
    torch.manual_seed(0)
    policy = load_policy(model_dir, device=device)
    reference = None
    if mode == "copy":  # the classic set-up: a frozen second copy of the (SFT) weights
        reference = copy.deepcopy(policy.model).requires_grad_(False).eval()
    from peft import LoraConfig, get_peft_model

    policy.model = policy.adapter.model = get_peft_model(policy.model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS[policy.family]))
    policy.enable_gradient_checkpointing()  # the same memory settings for both set-ups
    value_head = ValueHead(policy.hidden_size).to(device)
    params = [p for p in policy.model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        import gc

        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux)
    images = [[Image.new("RGB", (64, 64), (i * 30 % 255, 80, 160))] for i in range(BATCH)]
    batch = policy.batch(images, ["Tell a story."] * BATCH)
    gen = policy.generate(batch, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS)
    with torch.no_grad():
        if reference is None:
            with policy.reference():
                ref = policy.forward(batch, gen.response_ids, gen.response_mask).logprobs
        else:
            ids = torch.cat([batch.prompt_ids, gen.response_ids], 1)
            mask = torch.cat([batch.prompt_mask, gen.response_mask], 1)
            t = gen.response_ids.shape[1]
            logits, _ = policy.adapter.forward(reference, batch, ids, mask, keep=t + 1)  # the policy's own forward, on the copy
            ref = torch.log_softmax(policy._suppress(logits[:, -t - 1 : -1].float()), -1).gather(2, gen.response_ids.unsqueeze(-1)).squeeze(-1)
        old = policy.forward(batch, gen.response_ids, gen.response_mask)
        old_values = value_head(old.hidden)
    rewards, _ = losses.kl_penalized_rewards(torch.zeros(BATCH, device=device), old.logprobs, ref, gen.response_mask, 0.1)
    adv, ret = losses.gae(rewards, old_values, gen.response_mask)
    adv = losses.masked_whiten(adv, gen.response_mask)
    for k in range(0, BATCH, MINI_BATCH):  # the update, over minibatches, as rlhf.ppo does it
        rows = list(range(k, k + MINI_BATCH))
        mb_mask = gen.response_mask[rows]
        out = policy.forward(batch.select(rows), gen.response_ids[rows], mb_mask)
        pg, _ = losses.ppo_policy_loss(out.logprobs, old.logprobs[rows], adv[rows], mb_mask)
        vf, _ = losses.ppo_value_loss(value_head(out.hidden), old_values[rows], ret[rows], mb_mask)
        (pg + 0.1 * vf).backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else (rss_kib("VmHWM") - baseline) / 1024
    return {"mode": mode, "peak_mib": round(peak, 1), "device": device, "measure": "cuda max_memory_allocated" if cuda else "peak RSS − RSS after imports"}


# ------------------------------------------------------------------------------------------------
# 2. Speed.
# ------------------------------------------------------------------------------------------------


def distinct2(text: str) -> float:
    words = text.split()
    grams = list(zip(words, words[1:]))
    return len(set(grams)) / len(grams) if grams else 0.0


def prompts_file(work: Path) -> Path:
    from PIL import Image

    (work / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(8):
        path = work / "img" / f"{i}.png"
        Image.new("RGB", (32, 32), (i * 30 % 255, 100, 200 - i * 20)).save(path)
        rows.append({"item_id": f"p{i}", "image_paths": [str(path)], "instruction": "Tell a story about this image."})
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return work / "prompts.jsonl"


def ours(model_dir: Path, prompts: Path, work: Path, iterations: int) -> float:
    from accelerate.state import AcceleratorState

    import rlhf.policy as policy_module
    from rlhf.ppo import PPOConfig, train

    AcceleratorState._reset_state(True)
    original = policy_module.StoryPolicy.generate

    def forced_length(self, batch, **kw):  # the same generation length as RLOO's: no early EOS
        return original(self, batch, **{**kw, "min_new_tokens": kw.get("max_new_tokens", GEN_TOKENS)})

    policy_module.StoryPolicy.generate = forced_length
    try:
        cfg = PPOConfig(policy=str(model_dir), prompts=str(prompts), output_dir=str(work / "ours"), reward_weights="repetition=1",
                        clip_model=None, sentence_model=None, iterations=iterations + 1, rollout_batch_size=BATCH, mini_batch_size=BATCH,
                        ppo_epochs=1, max_new_tokens=GEN_TOKENS, value_warmup_steps=0, save_every=10_000, sample_every=10_000)  # fmt: skip
        train(cfg)
    finally:
        policy_module.StoryPolicy.generate = original
    rows = [json.loads(x) for x in (work / "ours" / "metrics.jsonl").open()][-(iterations + 1) :]
    seconds = (rows[-1]["time/minutes"] - rows[0]["time/minutes"]) * 60  # iterations after the first
    return iterations * BATCH / seconds


def trl_rloo(model_dir: Path, prompts: Path, work: Path, iterations: int) -> float:
    import datasets
    from PIL import Image
    from transformers import AutoProcessor, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    rows = [json.loads(x) for x in prompts.open()]
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["instruction"]}]}],
                                      "images": [Image.open(r["image_paths"][0]).convert("RGB")]} for r in rows] * 8)  # fmt: skip

    def reward(completions, **kwargs):
        return [distinct2(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t)

    cfg = RLOOConfig(output_dir=str(work / "rloo"), use_cpu=True, bf16=False, per_device_train_batch_size=BATCH, num_generations=4,
                     max_completion_length=GEN_TOKENS, max_steps=iterations + 1, report_to=[], logging_steps=1000, save_strategy="no",
                     temperature=1.0, top_k=0, top_p=1.0, generation_kwargs={"min_new_tokens": GEN_TOKENS}, seed=0)  # fmt: skip
    trainer = RLOOTrainer(model=str(model_dir), reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=AutoProcessor.from_pretrained(model_dir), callbacks=[Clock()])  # fmt: skip
    trainer.train()
    return iterations * BATCH / sum(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=4, help="timed iterations per round (after one warm-up)")
    p.add_argument("--out", type=Path, default=Path("bench/out/ppo-memory-speed.json"))
    p.add_argument("--only", choices=["memory", "speed"], help="run one half of the benchmark")
    p.add_argument("--measure", choices=["adapter-off", "copy"], help=argparse.SUPPRESS)  # internal: one memory set-up
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure_memory(args.model, args.measure)))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    report: dict = json.loads(args.out.read_text()) if args.out.exists() else {}  # one half at a time keeps the other's figures
    report["date"] = time.strftime("%Y-%m-%d")
    if args.only in (None, "memory"):  # 1. Memory, each set-up in a fresh process, alternating.
        report["params"] = build_100m(work / "m100")
        # Two allocators: glibc's default keeps freed blocks (RSS then holds its cache, like CUDA's reserved memory);
        # with a fixed mmap threshold every large tensor goes back to the OS when freed, so RSS follows the live
        # tensors, as torch.cuda.max_memory_allocated does on a GPU.
        allocators = {"live": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "glibc-default": {}}
        for name, env in allocators.items():
            memory: dict[str, list[float]] = {"adapter-off": [], "copy": []}
            for _ in range(args.rounds):
                for mode in memory:
                    run = subprocess.run([sys.executable, __file__, "--measure", mode, "--model", str(work / "m100")], capture_output=True,
                                         text=True, cwd=REPO, env=os.environ | env)  # fmt: skip
                    if run.returncode:
                        raise SystemExit(run.stderr[-2000:])
                    result = json.loads(run.stdout.strip().splitlines()[-1])
                    memory[mode].append(result["peak_mib"])
                    report["memory_measure"] = result["measure"]
            key = "" if name == "live" else "_glibc_default"
            report[f"memory_mib{key}"] = {k: statistics.median(v) for k, v in memory.items()} | {"runs": memory}
            report[f"memory_ratio{key}"] = round(report[f"memory_mib{key}"]["adapter-off"] / report[f"memory_mib{key}"]["copy"], 3)
            print(json.dumps(report, indent=1), flush=True)
    if args.only in (None, "speed"):  # 2. Speed on the tiny Qwen2-VL, alternating.
        from tests.fixtures.make_tiny import tiny_qwen2_vl

        tiny_qwen2_vl(work / "qwen", "2")
        prompts = prompts_file(work)
        speed: dict[str, list[float]] = {"ours": [], "trl_rloo": []}
        for r in range(args.rounds):
            speed["ours"].append(ours(work / "qwen", prompts, work / f"r{r}", args.iterations))
            speed["trl_rloo"].append(trl_rloo(work / "qwen", prompts, work / f"r{r}", args.iterations))
        report["samples_per_second"] = {k: round(statistics.median(v), 2) for k, v in speed.items()} | {"runs": speed}
        report["speed_ratio"] = round(report["samples_per_second"]["ours"] / report["samples_per_second"]["trl_rloo"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
