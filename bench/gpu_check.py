"""GPU check: every trainer on CUDA in bf16, through a real `accelerate launch`, with its peak memory.

    python bench/gpu_check.py --out DIR            (a CUDA machine; about 5 minutes on one H200)
    python bench/gpu_check.py --out DIR --cpu      (the same runs on the CPU, fp32: checks this script)

CI has no GPU, so this is what a maintainer runs when one is at hand. It builds tiny models
(`tests/fixtures/make_tiny.py`: ViT-GPT2, Qwen2-VL, a text encoder, a CLIP) and a tiny storyworld
world with preference pairs, then runs each entry point as a user would, in its own process through
`accelerate launch --num_processes 1 --mixed_precision bf16`:

- `rlhf.sft` (ViT-GPT2 from scratch, `--bf16`), `rlhf.train_rm` (clip-fusion, `--bf16`);
- `rlhf.dpo --bf16` on Qwen2-VL and on ViT-GPT2;
- `rlhf.ppo --bf16 --advantage gae | grpo | rloo` on Qwen2-VL with the composite reward
  (the reward model, CLIP, repetition).

Each run must exit 0, write a `metrics.json` that names the device (`cuda:…`, mixed precision
`bf16`) and its finite losses, and (where it trains an adapter) save a LoRA adapter that moved. The
peak memory is each run's own `peak_memory_mib` (`torch.cuda.max_memory_allocated`). Then a model of
realistic width, the ~100M-parameter ViT-GPT2 of `bench/ppo_memory_speed.py`, runs DPO and GRPO
steps in bf16 with LoRA, for their peak memory and step time. Writes DIR/gpu_check.json as it goes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def trl_rows(world: Path) -> list[dict]:
    """One TRL row per item: its best candidate by the hidden utility against its worst."""
    from annotate.formats import format_prompt

    rows = []
    for line in (world / "world.jsonl").open():
        item = json.loads(line)
        ranked = sorted(item["candidates"], key=lambda c: -c["utility"])
        rows.append({"prompt": format_prompt(item["instruction"], item["style"], item["context"]), "chosen": ranked[0]["text"],
                     "rejected": ranked[-1]["text"], "images": [str(world / p) for p in item["image_paths"]], "item_id": item["external_id"]})  # fmt: skip
    return rows


def build(root: Path) -> None:
    """Tiny models, a world, TRL pairs and a reward model with a random head (PPO's `human` signal)."""
    import torch

    from rlhf.reward_model import RewardModel, RewardModelConfig
    from storyworld.world import make_world
    from tests.fixtures import make_tiny

    world = make_world(root / "world", 48, seed=3, frames=(1, 2), image_size=(32, 32))
    torch.manual_seed(0)
    make_tiny.tiny_vit_gpt2(root / "vit-gpt2")
    make_tiny.tiny_qwen2_vl(root / "qwen2-vl")
    make_tiny.tiny_text_encoder(root / "enc")
    make_tiny.tiny_clip(root / "clip")
    rows = trl_rows(world)
    (root / "trl").mkdir(exist_ok=True)
    (root / "trl" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (root / "trl" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    rm = RewardModel.build(RewardModelConfig(text_model=str(root / "enc"), clip_model=str(root / "clip"), clip_pretrained=None))
    with torch.no_grad():
        for p in rm.module.head.parameters():
            p.normal_(0, 0.5)
    rm.save_pretrained(root / "rm")


def launch(module: str, args: dict, cpu: bool, timeout: float) -> dict:
    """`accelerate launch … -m module --key value …`; returns exit code, seconds and the run's metrics.json."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    flags = []
    for k, v in args.items():
        if v is True:
            flags.append(f"--{k}")
        elif v is not None and v is not False:
            flags += [f"--{k}", str(v)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no" if cpu else "bf16", "--dynamo_backend", "no", "-m", module, *flags]  # fmt: skip
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = run.returncode, (run.stdout + run.stderr)[-2500:]
    except subprocess.TimeoutExpired as e:
        code, tail = -9, f"timed out after {timeout:.0f} s: {(e.stderr or b'')[-1500:]!r}"
    out = Path(args["output_dir"])
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    return {"module": module, "exit": code, "seconds": round(time.perf_counter() - t0, 1), "metrics": metrics, **({"tail": tail} if code else {})}


def adapter_moved(out: Path) -> bool | None:
    """Whether the saved LoRA adapter has a nonzero lora_B (it starts at zero); None where none was saved."""
    import torch
    from safetensors.torch import load_file

    files = list(out.glob("adapter_model.safetensors")) + list(out.glob("*/adapter_model.safetensors"))
    if not files:
        return None
    state = load_file(str(files[0]))
    return any(v.float().abs().sum().item() > 0 for k, v in state.items() if "lora_B" in k) and all(torch.isfinite(v.float()).all().item() for v in state.values())


def verdict(result: dict, cpu: bool, adapter: bool, loss_keys: tuple[str, ...]) -> list[str]:
    """What is wrong with one run (empty: it passed)."""
    m, problems = result["metrics"], []
    if result["exit"] != 0:
        return [f"exit {result['exit']}"]
    if not m:
        return ["no metrics.json"]
    if not cpu and not (str(m.get("device", "")).startswith("cuda") and m.get("mixed_precision") == "bf16" and m.get("peak_memory_mib")):
        problems.append(f"device {m.get('device')}, mixed precision {m.get('mixed_precision')}, peak {m.get('peak_memory_mib')}")
    for k in loss_keys:
        if not (isinstance(m.get(k), (int, float)) and math.isfinite(m[k])):
            problems.append(f"{k} = {m.get(k)!r}")
    if adapter and result.get("adapter_moved") is not True:
        problems.append(f"adapter moved: {result.get('adapter_moved')}")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work dir; the report is OUT/gpu_check.json")
    p.add_argument("--cpu", action="store_true", help="run everything on the CPU in fp32 (to check this script without a GPU)")
    p.add_argument("--timeout", type=float, default=150, help="seconds per run")
    p.add_argument("--skip-medium", action="store_true", help="skip the ~100M-parameter model's DPO and GRPO steps")
    args = p.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    root = args.out / "work"
    report: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "cpu_mode": args.cpu, "runs": {}}  # fmt: skip
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or pass --cpu to check the script")

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    t0 = time.perf_counter()
    build(root)
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    save()
    bf16 = None if args.cpu else True
    reward = {"reward_model": str(root / "rm"), "reward_weights": "human=1,clip=0.3,repetition=0.5", "clip_model": str(root / "clip"),
              "cache_dir": str(root / "cache")}  # fmt: skip
    ppo_common = {"policy": str(root / "qwen2-vl"), "prompts": str(root / "world" / "items.jsonl"), "iterations": 3, "rollout_batch_size": 8,
                  "mini_batch_size": 4, "ppo_epochs": 2, "max_new_tokens": 16, "value_warmup_steps": 1, "lr": 1e-3, "save_every": 100,
                  "sample_every": 100, "bf16": bf16, **reward}  # fmt: skip
    runs = {
        "sft vit-gpt2 (from scratch)": (
            "rlhf.sft",
            {"data": str(root / "world" / "sft.jsonl"), "init": "tiny-vit-gpt2", "epochs": 2, "batch_size": 8, "max_new_tokens": 16, "samples": 2, "bf16": bf16},
            False,
            ("eval_loss",),
        ),
        "train_rm clip-fusion": (
            "rlhf.train_rm",
            {"data": str(root / "trl"), "text_model": str(root / "enc"), "clip_model": str(root / "clip"), "epochs": 1, "batch_size": 8, "cache_dir": str(root / "cache"), "bf16": bf16},
            False,
            ("eval_loss", "eval_accuracy"),
        ),
        "dpo qwen2-vl": (
            "rlhf.dpo",
            {"policy": str(root / "qwen2-vl"), "data": str(root / "trl"), "batch_size": 8, "lr": 5e-3, "max_length": 64, "bf16": bf16, "logging_steps": 1},
            True,
            ("loss", "eval_loss"),
        ),
        "dpo vit-gpt2": (
            "rlhf.dpo",
            {"policy": str(root / "vit-gpt2"), "data": str(root / "trl"), "batch_size": 8, "lr": 5e-3, "max_length": 64, "bf16": bf16, "logging_steps": 1},
            True,
            ("loss", "eval_loss"),
        ),
        "ppo qwen2-vl (gae)": ("rlhf.ppo", {**ppo_common, "advantage": "gae"}, True, ("ppo/kl", "reward/total")),
        "ppo qwen2-vl (grpo, k3 KL loss)": ("rlhf.ppo", {**ppo_common, "advantage": "grpo", "samples_per_prompt": 4, "kl_in": "loss"}, True, ("ppo/kl", "reward/total")),
        "ppo qwen2-vl (rloo)": ("rlhf.ppo", {**ppo_common, "advantage": "rloo", "samples_per_prompt": 4}, True, ("ppo/kl", "reward/total")),
    }
    if not args.skip_medium:
        from bench.ppo_memory_speed import build_100m

        build_100m(root / "vit-gpt2-100m")
        medium = {"policy": str(root / "vit-gpt2-100m"), "bf16": bf16, "gradient_checkpointing": True}
        runs["dpo vit-gpt2 ~100M (LoRA r16, batch 8)"] = ("rlhf.dpo", {**medium, "data": str(root / "trl"), "batch_size": 8, "max_length": 128, "logging_steps": 1}, True, ("loss",))
        runs["ppo vit-gpt2 ~100M (grpo, 8 prompts x 4, 32 tokens)"] = (
            "rlhf.ppo",
            {**ppo_common, **medium, "advantage": "grpo", "samples_per_prompt": 4, "rollout_batch_size": 32, "mini_batch_size": 8, "max_new_tokens": 32, "iterations": 2},
            True,
            ("ppo/kl",),
        )
    for name, (module, run_args, adapter, loss_keys) in runs.items():
        out = root / name.split(" (")[0].replace(" ", "-").replace("~", "") / name.replace(" ", "_").replace("/", "_")[:40]
        result = launch(module, {**run_args, "output_dir": str(out)}, args.cpu, args.timeout)
        if adapter:
            result["adapter_moved"] = adapter_moved(out)
        result["problems"] = verdict(result, args.cpu, adapter, loss_keys)
        m = result["metrics"]
        print(f"{'ok  ' if not result['problems'] else 'FAIL'} {name}: {result['seconds']} s, peak {m.get('peak_memory_mib')} MiB on "
              f"{m.get('device')} ({m.get('mixed_precision')}) {'; '.join(result['problems'])}", flush=True)  # fmt: skip
        report["runs"][name] = {k: v for k, v in result.items() if k != "metrics"} | {"metrics": {k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None}}
        save()
    report["passed"] = all(not r["problems"] for r in report["runs"].values())
    report["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    save()
    print(json.dumps({"passed": report["passed"], "minutes": report["minutes"]}))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
