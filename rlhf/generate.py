"""Write new candidate stories for annotation: annotate → train → generate → annotate.

    python -m rlhf.generate --policy runs/ppo --items world/items.jsonl --per_item 2 --out new.jsonl
    python -m rlhf.generate --policy runs/ppo --db sqlite:///data/storypref.db --project demo --per_item 2
    python -m rlhf.generate --policy runs/sft --items items.jsonl --best_of 8 --reward runs/rm --out best.jsonl

Items come from a JSONL (storyworld's `items.jsonl`, `annotate.ingest`'s jsonl) or straight from a
project in the database. Each item gets `--per_item` new stories, sampled at `--temperature` and
asked in the item's style or in `--style` (style control goes through the instruction). With
`--best_of N`, N samples are drawn per new candidate and the one the reward model `--reward` scores
highest is kept (inference-time control by reranking). Every candidate records its origin (the
model and a hash of its adapter) and its sampling parameters.

The output is either a JSONL that `annotate.ingest` reads as is (`--out`), or, without `--out`, new
candidates and comparisons (each new story against the item's other candidates) written into the
database in one transaction, where the app serves them at once.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf.loading import ModelLoadError
from rlhf.policy import load_policy
from rlhf.stories import StoryDataError, StoryExample, read_examples


@dataclass
class GenerateConfig:
    policy: str = field(metadata={"help": "the policy: HF id or path, or a dir written by rlhf.sft / rlhf.ppo"})
    items: str | None = field(default=None, metadata={"help": "items JSONL (image_paths, instruction, style, candidates); or use --db and --project"})
    db: str | None = field(default=None, metadata={"help": "database URL: read the project's items from it, and write there unless --out is given"})
    project: str | None = field(default=None, metadata={"help": "project name in --db"})
    out: str | None = field(default=None, metadata={"help": "write a JSONL for annotate.ingest here instead of into the database"})
    sft_adapter: str | None = field(default=None, metadata={"help": "an SFT LoRA adapter to merge into --policy first"})
    per_item: int = field(default=2, metadata={"help": "new candidates per item"})
    style: str | None = field(default=None, metadata={"help": "ask every story in this style (default: the item's own)"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=160, metadata={"help": "story length limit in tokens"})
    best_of: int = field(default=1, metadata={"help": "sample N per candidate and keep the one --reward scores highest"})
    reward: str | None = field(default=None, metadata={"help": "a reward model dir (rlhf.train_rm) for --best_of"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    limit: int | None = field(default=None, metadata={"help": "only the first N items"})
    window: int = field(default=0, metadata={"help": "with --items: K, write the next part of each story for every frame T after the K-th (from frames T-K..T and the text before T); 0: whole stories"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 … (default: cuda if available)"})


def items_from_db(url: str, project: str, limit: int | None) -> list[tuple[StoryExample, dict]]:
    """The project's items as examples (images from the media root) and their current candidates."""
    from sqlalchemy import select

    from db import Candidate, Item, Project, get_meta, open_db

    _, factory = open_db(url)
    with factory() as s:
        proj = s.scalar(select(Project).where(Project.name == project))
        if proj is None:
            raise StoryDataError(f"{url}: no project {project!r}; see python -m annotate.users or the app's admin tab")
        root = Path(get_meta(s, "media_root") or ".")
        out = []
        for item in s.scalars(select(Item).where(Item.project_id == proj.id).order_by(Item.id).limit(limit)):
            images = [str(root / img.path) for img in item.images]
            missing = [p for p in images if not Path(p).is_file()]
            if missing:
                raise StoryDataError(f"item {item.external_id!r}: image {missing[0]} is missing from the media root {root}")
            cands = s.scalars(select(Candidate).where(Candidate.item_id == item.id).order_by(Candidate.id)).all()
            row = {"external_id": item.external_id, "source": item.source, "image_paths": images, "instruction": item.instruction,
                   "style": item.style, "context": item.context,
                   "candidates": [{"text": c.text, "origin": c.origin, "gen_params": c.gen_params} for c in cands]}  # fmt: skip
            out.append((StoryExample(item.external_id, images, item.instruction, item.style, item.context), row))
    return out


def items_from_file(path: str, limit: int | None, window: int = 0) -> list[tuple[StoryExample, dict]]:
    examples = read_examples(path, limit=limit, window=window)
    rows = []
    lines = [json.loads(x) for x in Path(path).open(encoding="utf-8") if x.strip()] if Path(path).is_file() else []
    for e in examples:
        d = lines[e.meta["line"] - 1] if "line" in e.meta and not window and lines else {}  # a window's candidates are new
        rows.append({"external_id": e.item_id, "source": Path(path).name, "image_paths": e.images, "instruction": e.instruction,
                     "style": e.style, "context": e.context, "candidates": list(d.get("candidates") or [])})  # fmt: skip
    return list(zip(examples, rows))


def generate_candidates(cfg: GenerateConfig, items: list[tuple[StoryExample, dict]]) -> list[dict]:
    """Rows with the new candidates appended: {external_id, image_paths, …, candidates: [...]}."""
    from tqdm import tqdm

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_policy(cfg.policy, sft_adapter=cfg.sft_adapter, device=device, trainable=False)
    reward = None
    if cfg.best_of > 1:
        if not cfg.reward:
            raise ModelLoadError("--best_of needs --reward, a reward model directory written by rlhf.train_rm")
        from rlhf.reward_model import RewardModel

        reward = RewardModel.from_pretrained(cfg.reward, device=device)
    origin = f"policy:{Path(cfg.policy).name}" + (f"@{h}" if (h := policy.adapter_hash()) else "")
    params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "best_of": cfg.best_of,
              "seed": cfg.seed, "model": policy.info.base, "sft_adapter": policy.info.sft_adapter or cfg.sft_adapter}  # fmt: skip
    if cfg.best_of > 1:
        params["reward"] = cfg.reward
    torch.manual_seed(cfg.seed)
    n = cfg.per_item * cfg.best_of  # samples per item
    rows = []
    for k in tqdm(range(0, len(items), cfg.batch_size), desc="generate", unit="batch"):
        chunk = items[k : k + cfg.batch_size]
        styles = [cfg.style or e.style for e, _ in chunk]
        batch = policy.examples_batch([e for e, _ in chunk], style=cfg.style)
        out = policy.generate(batch.repeat(n), max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        texts = out.texts  # item i's samples are rows i*n … i*n+n-1
        scores = None
        if reward is not None:
            scores = reward.score([e.images for (e, _) in chunk for _ in range(n)], [e.instruction for (e, _) in chunk for _ in range(n)],
                                  texts, context=[e.context for (e, _) in chunk for _ in range(n)],
                                  style=[s for s in styles for _ in range(n)])  # fmt: skip
        for i, ((_e, row), style) in enumerate(zip(chunk, styles)):
            new = []
            for c in range(cfg.per_item):
                group = list(range(i * n + c * cfg.best_of, i * n + (c + 1) * cfg.best_of))
                best = max(group, key=lambda j: scores[j].item()) if scores is not None else group[0]
                gen = dict(params, style=style, ended=bool(out.ended[best]))
                if scores is not None:
                    gen["reward"] = round(scores[best].item(), 4)
                seen = {c["text"] for c in row["candidates"] + new}
                if texts[best].strip() and texts[best] not in seen:  # a story the item already has adds nothing
                    new.append({"text": texts[best], "origin": origin, "gen_params": gen})
            rows.append(dict(row, candidates=row["candidates"] + new, new=len(new)))
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """All-or-nothing: a temp file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k not in ("source", "new")}) + "\n")
    os.replace(tmp, path)


def write_db(rows: list[dict], url: str, project: str) -> dict:
    """New candidates and their comparisons, into the project, in one transaction (per item source)."""
    from annotate.ingest import get_or_create_project, read_source, write_records, write_transaction
    from db import open_db

    _, factory = open_db(url)
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    totals: dict[str, int] = defaultdict(int)
    with tempfile.TemporaryDirectory() as tmp, write_transaction(factory) as (session, root, created):
        proj = get_or_create_project(session, project)
        for n, (source, group) in enumerate(by_source.items()):
            path = Path(tmp) / f"{n}.jsonl"
            write_jsonl(group, path)
            image_root = Path(os.path.commonpath([str(Path(p).resolve().parent) for r in group for p in r["image_paths"]]))
            _, records = read_source(str(path), "jsonl", image_root=image_root)
            stats = write_records(session, proj, records, source=source, media_root=root, created_files=created)
            for k, v in asdict(stats).items():
                if isinstance(v, int):  # counts (not the reader's notes)
                    totals[k] += v
    return dict(totals)


def main(cfg: GenerateConfig) -> dict:
    # 1. Items, all checked before the model loads.
    if cfg.items is None and (cfg.db is None or cfg.project is None):
        raise StoryDataError("pass --items FILE, or --db URL with --project NAME")
    if cfg.out is None and (cfg.db is None or cfg.project is None):
        raise StoryDataError("pass --out FILE, or --db URL with --project NAME to write into the database")
    if cfg.window and not cfg.items:
        raise StoryDataError("--window cuts stories read with --items; a project's items are windowed at ingest (annotate.ingest --window K)")
    items = items_from_file(cfg.items, cfg.limit, cfg.window) if cfg.items else items_from_db(cfg.db, cfg.project, cfg.limit)
    # 2. Generate.
    rows = generate_candidates(cfg, items)
    new = sum(r["new"] for r in rows)
    # 3. Write.
    if cfg.out:
        write_jsonl(rows, Path(cfg.out))
        result = {"items": len(rows), "new_candidates": new, "out": cfg.out}
    else:
        result = {"items": len(rows), "new_candidates": new, **write_db(rows, cfg.db, cfg.project)}
    print(json.dumps(result))
    return result


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    from trl import TrlParser

    (cfg,) = TrlParser(dataclass_types=[GenerateConfig], description=__doc__.split("\n\n")[0]).parse_args_and_config(argv)
    return cfg


if __name__ == "__main__":
    from annotate.ingest import IngestError

    try:
        main(parse_args())
    except (StoryDataError, ModelLoadError, IngestError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
