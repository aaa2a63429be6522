"""Yardstick: how much of the labels can simple text features learn, beside the reward model?

    python bench/rm_probe_storyworld.py bench/out/ppo-w51 bench/out/ppo-w52 bench/out/ppo-w53 [--out FILE]
    python bench/rm_probe_storyworld.py bench/out/ppo-w51 --ensemble rm,rm-fp32,rm-text,rm-fuse2,rm-align

On each finished `bench/ppo_storyworld.py` run (its export in trl/, the policy's round in
world-aug/), logistic regressions are fit on the train pairs' feature differences (chosen −
rejected, each pair also flipped) and scored on the test pairs, as the reward model is:

- **bag of words**: unigram and bigram counts, `rlhf.rewards.bag_of_words_scorer` (the yardstick
  `python -m rlhf.rewards` prints beside the signals);
- **binding**: three numbers per story read with storyworld's grammar ("Remy the green square"):
  how many named characters are given more than one look, how many are named, and the words;
- **entities**: the library's own reading of who is described how (`rlhf.entities`, what
  `rlhf.train_rm --entity_features` hands the reward model: characters given two descriptions, extra
  descriptions, characters described), and the words; an English heuristic, not storyworld's grammar;
- **both**: bag of words and binding.

Reported per world: accuracy against the majority labels on all test pairs and on the policy's own
test pairs, and against the hidden utility on the policy's pairs (what the bench's reward model
reports as `rm.hidden_utility_accuracy`), beside the reward model's figures from report.json. The
binding features are storyworld's own grammar, which a reward model never sees; they show how much
of the labels a model that binds names to looks across sentences could learn from the same pairs.

`--clip A,B,...` scores the policy's held-out pairs with CLIPScore (`rlhf.rewards`' `clip` signal)
from each CLIP in RUN/A, RUN/B, ... (such as `python -m storyworld train-clip --world RUN/world --out
RUN/A` with other options): agreement with the annotators (95% interval) and, per component of the
hidden utility, with the utility (`bench/ppo_storyworld.py`'s diagnosis), grounding precision included.

`--mix-weights W1,W2,...` scores the policy's held-out pairs with `human` + W·`clip` (the run's reward
model and CLIP, each signal divided by its std over those pairs' stories, as `python -m rlhf.rewards
--mix` does) for each W: agreement with the annotators and, per component, with the utility (the
diagnosis above). W = 0 is the reward model alone.

`--ensemble A,B,...` also scores the policy's pairs with each reward model in RUN/A, RUN/B, ... (as
`bench/ppo_storyworld.py --rm-only` trains them on the same export) and with their ensemble, the sum
of their normalized score differences.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.entities import entity_features  # noqa: E402

BINDING = re.compile(r"\b([A-Z][a-z]+) the (\w+) (\w+)\b")


def binding_features(story: str) -> list[float]:
    looks: dict[str, set] = {}
    for name, color, shape in BINDING.findall(story):
        looks.setdefault(name, set()).add((color, shape))
    return [float(sum(len(v) > 1 for v in looks.values())), float(len(looks)), float(len(story.split()))]


def _text(row: dict, side: str) -> str:
    return row[side][0]["content"] if isinstance(row[side], list) else row[side]


def _stories(run: Path) -> tuple[set, dict]:
    """The policy's samples, as (item, text), and every candidate's hidden utility, from the run's annotation rounds."""
    rounds = [run / d / "world.jsonl" for d in ("world-grammar", "world-aug") if (run / d / "world.jsonl").exists()]
    utility = {(w["external_id"], c["text"]): c["utility"] for f in rounds for w in map(json.loads, f.open()) for c in w["candidates"]}
    policy = {(w["external_id"], c["text"]) for w in map(json.loads, (run / "world-aug" / "world.jsonl").open()) for c in w["candidates"]}
    return policy, utility


def ensemble(run: Path, names: list[str]) -> dict:
    """Each reward model's and their sum's agreement on the policy's held-out pairs: (with the labels, with the utility)."""
    import torch

    from rlhf.data import load_preferences
    from rlhf.reward_model import RewardModel

    policy, utility = _stories(run)
    held = [p for p in load_preferences(run / "trl")[1] if not p.tie and (p.item_id, p.chosen) in policy and (p.item_id, p.rejected) in policy]
    if not held:
        return {"pairs": 0}
    right = torch.tensor([utility[(p.item_id, p.chosen)] > utility[(p.item_id, p.rejected)] for p in held])
    decided = torch.tensor([utility[(p.item_id, p.chosen)] != utility[(p.item_id, p.rejected)] for p in held])

    def agreement(d):
        return {"vs_labels_policy_pairs": round((d > 0).float().mean().item(), 3),
                "vs_utility_policy_pairs": round(((d > 0) == right)[decided].float().mean().item(), 3)}  # fmt: skip

    diffs = {}
    for name in names:
        rm = RewardModel.from_pretrained(run / name, cache_dir=str(run / "clip-cache"))
        args = ([p.images for p in held], [p.prompt for p in held])
        diffs[name] = rm.score(*args, [p.chosen for p in held]) - rm.score(*args, [p.rejected for p in held])
    return {name: agreement(d) for name, d in diffs.items()} | {"ensemble": agreement(sum(diffs.values())), "pairs": len(held)}


def clip_scores(run: Path, names: list[str]) -> dict:
    """Each CLIP's `clip` signal on the policy's held-out pairs: agreement with the labels, and the per-component diagnosis."""
    from bench.ppo_storyworld import component_diagnosis
    from rlhf.data import load_preferences
    from rlhf.rewards import build_reward, signal_agreement

    policy, _ = _stories(run)
    held = [p for p in load_preferences(run / "trl")[1] if (p.item_id, p.chosen) in policy and (p.item_id, p.rejected) in policy]
    world = {json.loads(x)["external_id"]: json.loads(x) for x in (run / "world" / "world.jsonl").open()}
    out = {}
    for name in names:
        if not (run / name / "open_clip_config.json").exists():
            sys.exit(f"--clip {name}: {run / name} holds no open_clip model (open_clip_config.json); train one there first")
        # The bench's cache: its entries are keyed by the CLIP's own weights, so CLIPs do not mix.
        signal = build_reward({"clip": 1.0}, clip_model=str(run / name), cache_dir=str(run / "clip-cache"))
        agreement = signal_agreement(signal, held)
        diagnosis = component_diagnosis(signal, held, world)
        out[name] = {"vs_labels_policy_pairs": agreement.get("clip"), "interval": agreement.get("interval", {}).get("clip"), "pairs": agreement["pairs"],
                     "vs_utility_by_component": {k: {"pairs": v["pairs"], "clip": v.get("clip")} for k, v in diagnosis.items() if k != "pairs"}}  # fmt: skip
    return out


class _ScoredOnce:
    """A reward whose raw scores are kept per story (its frames, prompt and text): the mixes below score the same
    pairs for every weight, and each story goes through the reward model and CLIP once."""

    def __init__(self, reward):
        self.reward, self.weights, self.seen = reward, reward.weights, {}

    def __call__(self, images, instructions, contexts, styles, stories, update=False):
        import torch

        keys = [(str(i), a, c, s, t) for i, a, c, s, t in zip(images, instructions, contexts, styles, stories)]
        new = list({k: j for j, k in enumerate(keys) if k not in self.seen}.values())  # one index per story not yet scored
        if new:
            _, raw = self.reward(*([arg[j] for j in new] for arg in (images, instructions, contexts, styles, stories)), update=False)
            for n, j in enumerate(new):
                self.seen[keys[j]] = {name: v[n] for name, v in raw.items()}
        return None, {name: torch.stack([self.seen[k][name] for k in keys]) for name in self.seen[keys[0]]}


def clip_mixes(run: Path, clip_weights: list[float]) -> dict:
    """`human` + w·`clip` on the policy's held-out pairs, for each w: agreement with the annotators and the per-component
    diagnosis, each signal divided by its population std over the decided pairs' stories (as `signal_agreement`'s mix)."""
    from bench.ppo_storyworld import component_diagnosis
    from rlhf.data import load_preferences
    from rlhf.rewards import build_reward, score_pairs, signal_agreement

    policy, _ = _stories(run)
    held = [p for p in load_preferences(run / "trl")[1] if (p.item_id, p.chosen) in policy and (p.item_id, p.rejected) in policy]
    decided = [p for p in held if not p.tie]
    if not decided:
        return {"pairs": 0}
    world = {json.loads(x)["external_id"]: json.loads(x) for x in (run / "world" / "world.jsonl").open()}
    signals = _ScoredOnce(build_reward({"human": 1.0, "clip": 1.0}, reward_model=str(run / "rm"), clip_model=str(run / "clip"),
                                       cache_dir=str(run / "clip-cache")))  # fmt: skip
    stds = {name: v.std(unbiased=False).item() or 1.0 for name, v in score_pairs(signals, decided).items()}
    out = {}
    for w in clip_weights:
        mix = {"human": 1.0, "clip": w}
        agreement = signal_agreement(signals, held, mix=mix)

        def mixed(*args, update=False, mix=mix):
            _, raw = signals(*args, update=False)
            return None, {"mix": sum(wk * raw[k].double() / stds[k] for k, wk in mix.items())}

        diagnosis = component_diagnosis(mixed, held, world)
        out[str(w)] = {"vs_labels_policy_pairs": agreement["mix"], "interval": agreement["interval"]["mix"], "pairs": agreement["pairs"],
                       "vs_utility_by_component": {k: {"pairs": v["pairs"], "mix": v.get("mix")} for k, v in diagnosis.items() if k != "pairs"}}  # fmt: skip
    return out


def probe(run: Path) -> dict:
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    load = lambda f: [r for r in map(json.loads, f.open()) if not r.get("tie")]  # noqa: E731
    train, test = load(run / "trl" / "train.jsonl"), load(run / "trl" / "test.jsonl")
    policy, utility = _stories(run)
    vec = CountVectorizer(ngram_range=(1, 2), min_df=2).fit([_text(r, s) for r in train for s in ("chosen", "rejected")])

    def diffs(rows: list[dict], kind: str):
        parts = []
        if kind in ("bow", "both"):
            parts.append(vec.transform([_text(r, "chosen") for r in rows]) - vec.transform([_text(r, "rejected") for r in rows]))
        if kind in ("binding", "both"):
            f = np.array([np.subtract(binding_features(_text(r, "chosen")), binding_features(_text(r, "rejected"))) for r in rows])
            parts.append(sp.csr_matrix(f))
        if kind == "entities":
            read = lambda t: [*entity_features(t), float(len(t.split()))]  # noqa: E731
            parts.append(sp.csr_matrix(np.array([np.subtract(read(_text(r, "chosen")), read(_text(r, "rejected"))) for r in rows])))
        return sp.hstack(parts).tocsr()

    flip = np.where(np.random.default_rng(0).random(len(train)) < 0.5, -1.0, 1.0)
    held_policy = [i for i, r in enumerate(test) if (r["item_id"], _text(r, "chosen")) in policy and (r["item_id"], _text(r, "rejected")) in policy]
    decided = [i for i in held_policy if utility[(test[i]["item_id"], _text(test[i], "chosen"))] != utility[(test[i]["item_id"], _text(test[i], "rejected"))]]
    right = np.array([utility[(test[i]["item_id"], _text(test[i], "chosen"))] > utility[(test[i]["item_id"], _text(test[i], "rejected"))] for i in decided])
    out: dict = {"train_pairs": len(train), "test_pairs": len(test), "policy_test_pairs": len(held_policy)}
    from rlhf.data import load_preferences
    from rlhf.rewards import bag_of_words_scorer

    share = lambda hits: round(float(np.mean(hits)), 3) if len(hits) else None  # noqa: E731  (None: no such pairs)
    # The bag of words is rlhf.rewards' yardstick (what `python -m rlhf.rewards` prints), fit on the same train pairs.
    pairs_train, pairs_test, _ = load_preferences(run / "trl")
    scorer = bag_of_words_scorer(pairs_train)
    by_text = {(p.item_id, p.chosen, p.rejected): p for p in pairs_test}
    rows = [by_text[(r["item_id"], _text(r, "chosen"), _text(r, "rejected"))] for r in test]
    score = np.subtract(scorer([p.chosen for p in rows]), scorer([p.rejected for p in rows]))
    out["bow"] = {"vs_labels": share(score > 0), "vs_labels_policy_pairs": share(score[held_policy] > 0),
                  "vs_utility_policy_pairs": share((score[decided] > 0) == right)}  # fmt: skip
    for kind in ("binding", "entities", "both"):
        x = diffs(train, kind)
        model = LogisticRegression(C=0.1 if kind == "both" else 1.0, max_iter=5000, fit_intercept=False)
        model.fit(sp.diags(flip) @ x, (flip > 0).astype(int))
        score = diffs(test, kind) @ model.coef_.ravel()
        out[kind] = {"vs_labels": share(score > 0), "vs_labels_policy_pairs": share(score[held_policy] > 0),
                     "vs_utility_policy_pairs": share((score[decided] > 0) == right)}  # fmt: skip
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else {}
    rm = report.get("rm", {})
    out["reward_model"] = {"vs_labels": rm.get("eval_accuracy"), "vs_labels_policy_pairs": report.get("signals_vs_annotators", {}).get("human"),
                           "vs_utility_policy_pairs": rm.get("hidden_utility_accuracy")}  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished bench/ppo_storyworld.py output directories")
    p.add_argument("--out", type=Path, help="also write the results here (JSON)")
    p.add_argument("--ensemble", help="reward-model dirs inside each run, comma-separated: each one's and their sum's agreement")
    p.add_argument("--clip", help="CLIP dirs inside each run, comma-separated: each one's CLIPScore agreement on the policy's pairs")
    p.add_argument("--mix-weights", metavar="W1,W2,...",
                   help="clip weights beside human=1, comma-separated (e.g. 0,0.3,1): each mix's agreement on the policy's pairs, by component")
    args = p.parse_args()
    try:
        clip_weights = [float(w) for w in args.mix_weights.split(",")] if args.mix_weights else []
    except ValueError:
        p.error(f"--mix-weights {args.mix_weights!r}: give numbers, comma-separated (e.g. 0,0.3,1)")
    for run in args.runs:
        if not ((run / "trl" / "train.jsonl").exists() and (run / "world-aug" / "world.jsonl").exists()):
            p.error(f"{run}: no export (trl/train.jsonl) and policy round (world-aug/world.jsonl); run bench/ppo_storyworld.py there first")
    results = {str(run): probe(run) | ({"ensemble": ensemble(run, args.ensemble.split(","))} if args.ensemble else {})
               | ({"clip": clip_scores(run, args.clip.split(","))} if args.clip else {})
               | ({"mix": clip_mixes(run, clip_weights)} if clip_weights else {}) for run in args.runs}  # fmt: skip
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
