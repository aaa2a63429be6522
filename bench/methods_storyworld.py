"""Benchmark: which method to try first? PPO, GRPO, RLOO, DPO and best-of-8 on the same preferences, on fresh worlds.

    python bench/methods_storyworld.py --out bench/out/methods --worlds 61,62,63 --seeds 2
    python bench/methods_storyworld.py --smoke --out /tmp/methods-smoke          (a few minutes; CI runs it)

Per world, `bench/ppo_storyworld.py` builds what a user's project would (storyworld make, its tiny
CLIP and ViT, SFT, two rounds of simulated annotation, the export and the reward model) once, and
every method starts from the same SFT policy, export and reward model. A world already in DIR is
kept; one with fewer runs per method than `--seeds` gets the missing seeds added:

- **PPO**: `rlhf.ppo` as the bench's default (GAE, the composite reward, adaptive KL);
- **PPO on `human` alone** (`ppo_human`): the same run with the reward model as its only signal, so the
  composite's other signals (`clip`, `coherence`, ...) are measured by what they add;
- **GRPO** and **RLOO**: `rlhf.ppo --advantage grpo|rloo --samples_per_prompt 4` (GRPO with its KL
  as a k3 loss term, RLOO with the KL in the reward), everything else the same;
- **DPO**: `rlhf.dpo` on the export (conservative DPO, β 0.1, ε 0.1), no reward model, no sampling;
  **DPO on the votes' shares** (`dpo_soft`, `--aggregate soft`): a 2-to-1 pair's target is ⅔;
  **DPO, twice the epochs** (`dpo_long`): the control for the two-round methods' extra steps;
  **DPO with contrast pairs** (`dpo_contrast`, `--contrast_words`): half the pairs' chosen stories
  also face themselves with one color, shape, setting or time of day swapped (storyworld's words);
  **DPO on the hidden utility's labels** (`dpo_oracle`): the same train pairs, each chosen by the
  hidden utility instead of the votes: DPO's ceiling, as PPO's and GRPO's oracles are theirs;
- **iterative DPO** (`dpo_online`): `rlhf.online_dpo`, one round from the DPO policy on its own
  samples (4 on each of the 500 annotated scenes), best against worst by the composite reward;
  `dpo_online_oracle`, the same round ranked by the hidden utility (on-policy pairs, perfect labels);
- **DPO, a second round of votes** (`dpo_round2`): the DPO policy's samples on the same scenes get
  simulated votes (every pair, 3 votes each, as the pipeline's second round), then `rlhf.dpo` from
  the DPO policy on those pairs alone: the loop closed once more, with people ranking;
- **DPO on all three rounds** (`dpo_union`): the same new votes added to the project's database, as
  a user's third round would be, and `rlhf.dpo` from the SFT policy again on the export of all of them;
- **GRPO with a reward model on all three rounds** (`grpo_union`): the same export trains a new reward
  model, and GRPO runs from the SFT policy with it;
- **best-of-8**: 8 SFT samples per held-out scene, the reward model keeps one: no training.

With `--oracle` (the default) PPO and GRPO also run on the hidden utility itself: the ceiling of each
optimizer at these settings. Each method runs `--seeds` times (seeds s, s+1, ...). On 150 held-out
scenes, greedy stories are scored with the hidden utility: the win rate over the SFT policy (ties
half), the mean utility, and the KL to the SFT policy (k1 on sampled stories, nats per story;
best-of-n's analytic bound log n − (n−1)/n). Writes DIR/report.json, DIR/table.md (medians per
world and over the worlds, with the range) and DIR/win-vs-kl.png (each run's win against its KL).

`--paired A,B` runs nothing: on the worlds already in DIR it compares two methods (or `sft`) scene by
scene on the held-out scenes, from each run's stories in DIR/world-S/held-out/: per scene, A's
component (`--component`, default grounding_precision; or utility) averaged over A's runs minus B's,
then the mean per world and over all scenes with a 95% bootstrap interval (scenes resampled within
each world). For example `--paired ppo,ppo_human`: does the composite reward, `clip` in it, raise
grounding precision over the reward model alone?
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
METHODS = ("ppo", "ppo_human", "grpo", "rloo", "dpo", "dpo_soft", "dpo_long", "dpo_contrast", "dpo_oracle", "dpo_online", "dpo_online_oracle", "dpo_round2", "dpo_union", "grpo_union", "best_of")


def summarize(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 4) if values else None


def method_keys(worlds: dict[int, dict]) -> list[str]:
    """The table's methods in order: METHODS, then each method run on another reward model (bench/ppo_storyworld.py
    --add-seeds --ppo-rm NAME: ppo@NAME, grpo@NAME), grouped by reward model."""
    others = sorted({m for report in worlds.values() for m in report.get("methods", {}) if "@" in m}, key=lambda m: (m.split("@")[1], m))
    return [*METHODS, *others]


def table(worlds: dict[int, dict]) -> tuple[list[dict], str]:
    """One row per method: per-world medians, the median over the worlds and the worst world."""
    rows = []
    for method in method_keys(worlds):
        per_world = {seed: report["methods"].get(method, []) for seed, report in worlds.items()}
        if not any(per_world.values()):
            continue
        wins = {seed: summarize(runs, "win_rate_vs_sft") for seed, runs in per_world.items() if runs}
        minutes = [r.get("train_minutes", 0.0) + r.get("inference_minutes", 0.0) for runs in per_world.values() for r in runs]
        rows.append({
            "method": method,
            "win_rate_by_world": wins,
            "win_rate_median": round(statistics.median(wins.values()), 4),
            "win_rate_worst_world": min(wins.values()),
            "runs": {seed: [r["win_rate_vs_sft"] for r in runs] for seed, runs in per_world.items()},
            "utility_median": round(statistics.median(r["utility_ppo"] for runs in per_world.values() for r in runs), 4),
            "kl_median": round(statistics.median(r["kl_to_sft"] for runs in per_world.values() for r in runs), 3),
            "kl_max": round(max(r["kl_to_sft"] for runs in per_world.values() for r in runs), 3),
            "minutes_median": round(statistics.median(minutes), 2),
        })  # fmt: skip
    for oracle in ("oracle", "oracle_grpo"):
        wins = {seed: report[oracle]["win_rate_vs_sft"] for seed, report in worlds.items() if oracle in report}
        if wins:
            rows.append({"method": f"{'ppo' if oracle == 'oracle' else 'grpo'} on the hidden utility (ceiling)", "win_rate_by_world": wins,
                         "win_rate_median": round(statistics.median(wins.values()), 4), "win_rate_worst_world": min(wins.values()),
                         "utility_median": round(statistics.median(report[oracle]["utility_ppo"] for report in worlds.values() if oracle in report), 4),
                         "kl_median": round(statistics.median(report[oracle]["kl_to_sft"] for report in worlds.values() if oracle in report), 3)})  # fmt: skip
    seeds = list(worlds)
    lines = ["| method | " + " | ".join(f"win, world {s}" for s in seeds) + " | **median over worlds** | worst world | utility | KL to SFT (median, max) | minutes |",
             "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        cells = []
        for s in seeds:
            runs = r.get("runs", {}).get(s)
            cells.append(f"{r['win_rate_by_world'].get(s, float('nan')):.2f}" + (f" ({' / '.join(f'{w:.2f}' for w in runs)})" if runs and len(runs) > 1 else ""))
        kl = f"{r['kl_median']:.1f}" + (f", {r['kl_max']:.1f}" if "kl_max" in r else "")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | **{r['win_rate_median']:.2f}** | {r['win_rate_worst_world']:.2f} | "
                     f"{r['utility_median']:.2f} | {kl} | {r.get('minutes_median', '')} |")  # fmt: skip
    return rows, "\n".join(lines) + "\n"


def run_files(world_dir: Path, method: str) -> list[Path]:
    """The held-out stories of `method`'s runs in one world's dir: sft.jsonl; PPO's main run ppo.jsonl and its
    seeds ppo-seed-K.jsonl; any other method's METHOD-seed-K.jsonl (underscores written as hyphens)."""
    held = world_dir / "held-out"
    if method == "sft":
        return [held / "sft.jsonl"] if (held / "sft.jsonl").exists() else []
    stem = method.replace("_", "-")
    main = [held / "ppo.jsonl"] if method == "ppo" and (held / "ppo.jsonl").exists() else []
    return main + sorted(held.glob(f"{stem}-seed-*.jsonl"))


def paired_difference(worlds: dict[int, tuple[list[list[dict]], list[list[dict]]]], component: str, resamples: int = 2000,
                      seed: int = 0) -> dict:
    """A minus B, scene by scene. `worlds` maps a world to (A's runs, B's runs), each run a list of rows with
    `item_id` and `component`. Per scene of the world (the scenes every run holds): A's value averaged over its
    runs minus B's. Returns, per world, the mean difference and the scenes; over all worlds' scenes, the mean and a
    95% percentile-bootstrap interval, scenes resampled within each world so each world keeps its weight."""
    import numpy as np

    diffs: dict[int, np.ndarray] = {}
    for world, (a_runs, b_runs) in worlds.items():
        if not a_runs or not b_runs:
            raise ValueError(f"world {world}: {'A' if not a_runs else 'B'} has no runs with held-out stories to compare")
        runs = [{r["item_id"]: r[component] for r in run} for run in (*a_runs, *b_runs)]
        scenes = sorted(set.intersection(*(set(r) for r in runs)))
        if not scenes:
            raise ValueError(f"world {world}: the runs share no held-out scene")
        a = np.mean([[r[i] for i in scenes] for r in runs[: len(a_runs)]], axis=0)
        b = np.mean([[r[i] for i in scenes] for r in runs[len(a_runs) :]], axis=0)
        diffs[world] = a - b
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(list(diffs.values()))
    boot = np.empty(resamples)
    for k in range(resamples):
        boot[k] = np.concatenate([d[rng.integers(0, len(d), len(d))] for d in diffs.values()]).mean()
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"component": component, "by_world": {w: {"mean": round(float(d.mean()), 4), "scenes": len(d)} for w, d in diffs.items()},
            "mean": round(float(pooled.mean()), 4), "interval": [round(float(lo), 4), round(float(hi), 4)], "scenes": len(pooled)}  # fmt: skip


def plot_win_vs_kl(points: dict[str, list[tuple[float, float]]], path: Path, title: str = "Methods on storyworld") -> None:
    """Each run's win rate over SFT against its KL to SFT, one color per label: where a method lands on the
    trade-off between moving the policy and improving it (a run far right and low has over-optimized)."""
    from bench.plotting import pyplot

    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, xy in points.items():
        if xy:
            ax.scatter([x for x, _ in xy], [y for _, y in xy], label=label, alpha=0.8, s=22)
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("KL to the SFT policy (nats per story)")
    ax.set_ylabel("win rate over SFT (hidden utility, held-out scenes)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--worlds", default="61,62,63", help="world seeds, comma-separated: fresh ones no earlier benchmark used (default 61,62,63)")
    p.add_argument("--seeds", type=int, default=2, help="runs per method and world (seeds s, s+1, ...)")
    p.add_argument("--smoke", action="store_true", help="one tiny world in a few minutes (CI)")
    p.add_argument("--methods", default="all", metavar="LIST",
                   help=f"the methods besides PPO (which always runs), comma-separated: {', '.join(METHODS[1:])}, or all (the default)")
    p.add_argument("--no-oracle", action="store_true", help="skip the PPO and GRPO runs on the hidden utility (the ceilings)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="settings handed to bench/ppo_storyworld.py --set")
    p.add_argument("--paired", metavar="A,B",
                   help="run nothing: compare two methods (or sft) scene by scene on the worlds already in --out (see above)")
    p.add_argument("--component", default="grounding_precision",
                   help="with --paired: the utility component to compare (grounding_precision, consistency, ...) or utility")
    args = p.parse_args()
    try:
        worlds = [int(w) for w in args.worlds.split(",")] if not args.smoke else [int(args.worlds.split(",")[0])]
    except ValueError:
        p.error(f"--worlds {args.worlds!r}: give world seeds as integers, e.g. 61,62,63")
    if args.seeds < 1:
        p.error("--seeds: give 1 or more")
    chosen = list(METHODS[1:]) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(chosen) - set(METHODS[1:])):
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS[1:])} or all")
    if args.paired:
        pair = args.paired.split(",")
        if len(pair) != 2 or set(pair) - {"sft", *METHODS}:
            p.error(f"--paired {args.paired!r}: give two of sft, {', '.join(METHODS)}, comma-separated (e.g. ppo,ppo_human)")
        runs = {}
        for seed in worlds:
            files = [run_files(args.out / f"world-{seed}", m) for m in pair]
            if not all(files):
                missing = [m for m, f in zip(pair, files) if not f]
                p.error(f"--paired: {args.out / f'world-{seed}' / 'held-out'} holds no stories of {missing}; run those methods on world {seed} first")
            runs[seed] = tuple([[json.loads(x) for x in f.open()] for f in fs] for fs in files)
        try:
            result = paired_difference(runs, args.component)
        except KeyError as e:
            p.error(f"--component {args.component}: the held-out rows have no {e}; give a component of the hidden utility or utility")
        print(json.dumps({"paired": pair, **result}, indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    reports: dict[int, dict] = {}
    started = time.perf_counter()
    for seed in worlds:
        world_dir = args.out / f"world-{seed}"
        done = world_dir / "report.json"
        previous = json.loads(done.read_text()) if done.exists() else {}
        if "methods" in previous and min(len(previous["methods"].get(m, [])) for m in ["ppo", *chosen]) < args.seeds:
            # a finished world with fewer runs per method than asked (or a method it never ran): add them, keep the rest
            cmd = [sys.executable, str(REPO / "bench" / "ppo_storyworld.py"), "--out", str(world_dir), "--seed", str(seed), "--ppo-seeds",
                   str(args.seeds), "--methods", ",".join(chosen), "--add-seeds", *(["--smoke"] if args.smoke else []),
                   *(["--set", *args.set] if args.set else [])]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, env=env, check=True)
        elif "methods" not in previous:
            cmd = [sys.executable, str(REPO / "bench" / "ppo_storyworld.py"), "--out", str(world_dir), "--seed", str(seed), "--ppo-seeds", str(args.seeds),
                   "--methods", ",".join(chosen), *(["--smoke"] if args.smoke else []), *([] if args.no_oracle else ["--oracle"]),
                   *(["--set", *args.set] if args.set else [])]  # fmt: skip
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, env=env, check=True)
        reports[seed] = json.loads(done.read_text())
    rows, markdown = table(reports)
    report = {"worlds": worlds, "seeds": args.seeds, "smoke": args.smoke, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "minutes": round((time.perf_counter() - started) / 60, 2),
              "shared_minutes": {s: {k: r["phases"][k] for k in ("make", "sft", "generate", "annotate", "export", "reward_model") if k in r["phases"]}
                                 for s, r in reports.items()}}  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "table.md").write_text(markdown)
    points = {m: [(r["kl_to_sft"], r["win_rate_vs_sft"]) for rep in reports.values() for r in rep["methods"].get(m, [])] for m in method_keys(reports)}
    for oracle, label in (("oracle", "ppo, hidden utility"), ("oracle_grpo", "grpo, hidden utility")):
        points[label] = [(rep[oracle]["kl_to_sft"], rep[oracle]["win_rate_vs_sft"]) for rep in reports.values() if oracle in rep]
    plot_win_vs_kl(points, args.out / "win-vs-kl.png")
    print(markdown)


if __name__ == "__main__":
    main()
