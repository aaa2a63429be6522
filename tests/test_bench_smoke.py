"""The PPO storyworld benchmark end to end, in its short --smoke setting (the full one is in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int) -> str:
    """bench/SCRIPT with `args` in a fresh process, as a user runs it; its stderr's end on failure."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.mark.timeout(2100)
def test_methods_and_ppo_storyworld_smoke(tmp_path):
    """bench/methods_storyworld.py --smoke: one tiny world through bench/ppo_storyworld.py with every method, two seeds each, and the oracles."""
    base = ("--methods", "ppo_human,grpo,rloo,dpo,best_of")  # the DPO variants run once each, at the end
    run_bench("methods_storyworld.py", "--smoke", "--worlds", "0", "--seeds", "2", *base, "--out", str(tmp_path), timeout=1450)
    world = tmp_path / "world-0"
    report = json.loads((world / "report.json").read_text())
    for key in ("utility_sft", "utility_ppo", "win_rate_vs_sft", "kl_to_sft", "minutes"):
        assert isinstance(report[key], (int, float)), key
    assert 0.0 <= report["win_rate_vs_sft"] <= 1.0
    user = ("make", "sft", "generate", "annotate", "export", "reward_model", "ppo")
    bench = ("diagnostics_reward_model", "evaluate_sft", "evaluate_ppo", "ablation_seeds", "ablation_oracle", "ablation_oracle_blind_to_shapes",
             "ablation_oracle_grpo", "method_ppo_human", "method_grpo", "method_rloo", "method_dpo", "method_best_of")  # fmt: skip
    assert set(report["phases"]) == {*user, *bench}
    assert report["minutes"] == pytest.approx(sum(report["phases"][k] for k in user), abs=0.02)  # the user's pipeline, not the bench's evaluation
    assert report["minutes_with_ablations"] >= report["minutes"] + report["phases"]["ablation_seeds"] - 0.02
    seeds = report["seeds"]
    assert seeds["seed"] == [0, 1] and seeds["win_rate_vs_sft"][0] == report["win_rate_vs_sft"]
    assert seeds["win_rate_median"] == pytest.approx(sum(seeds["win_rate_vs_sft"]) / 2)  # the median of two
    assert 0.0 <= report["oracle"]["win_rate_vs_sft"] <= 1.0 and "reward/utility" in report["oracle"]["reward"]
    assert report["ppo"]["components_sft"] == report["oracle"]["components_sft"] and "words" in report["ppo"]["components_ppo"]
    assert report["sft"] == {"utility": report["utility_sft"], "components": report["ppo"]["components_sft"]}  # kept without PPO too
    assert report["ppo"]["reward"]["reward/human"] == report["ppo"]["reward"]["reward/human"]  # a number, not NaN
    agreement = report["signals_vs_annotators_all_rounds"]  # the smoke policy's samples all tie: its pairs come from the grammar round
    assert agreement["pairs"] > 0 and all(0.0 <= agreement[k] <= 1.0 for k in ("human", "clip", "coherence", "repetition", "style"))
    assert report["signals_vs_annotators"]["pairs"] <= agreement["pairs"] and report["rm"]["all_rounds"]["pairs_scored"] > 0
    for part in ("sft/metrics.json", "rm/metrics.json", "ppo/metrics.json", "ppo/adapter_model.safetensors", "trl/train.jsonl",
                 "grpo-seed-1/metrics.json", "rloo-seed-0/metrics.json", "dpo-seed-1/metrics.json", "grpo-oracle/metrics.json"):  # fmt: skip
        assert (world / part).exists(), part
    assert not (world / "grpo-seed-0" / "value_head.pt").exists() and (world / "ppo" / "value_head.pt").exists()
    # Every method ran twice, on the same held-out scenes, and is in the table.
    methods = report["methods"]
    assert set(methods) == {"ppo", "ppo_human", "grpo", "rloo", "dpo", "best_of"} and all(len(runs) == 2 for runs in methods.values())
    assert json.loads((world / "ppo-human-seed-1" / "ppo_config.json").read_text())["reward_weights"] == "human=1"
    assert [r["win_rate_vs_sft"] for r in methods["ppo"]] == seeds["win_rate_vs_sft"]
    assert methods["best_of"][0]["kl_to_sft"] == pytest.approx(2.0794 - 0.875, abs=1e-3)  # log 8 − 7/8
    assert all(0.0 <= r["win_rate_vs_sft"] <= 1.0 and r["kl_to_sft"] == r["kl_to_sft"] for runs in methods.values() for r in runs)
    summary = json.loads((tmp_path / "report.json").read_text())
    assert [r["method"] for r in summary["rows"]][:6] == ["ppo", "ppo_human", "grpo", "rloo", "dpo", "best_of"]
    assert summary["rows"][0]["win_rate_by_world"] == {"0": seeds["win_rate_median"]}
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + 8 and "ceiling" in table
    # Each policy's held-out stories, scene by scene, and --paired on them: PPO's two runs against SFT, on the utility,
    # is the difference of the report's means.
    held = {f.stem: [json.loads(x) for x in f.open()] for f in (world / "held-out").glob("*.jsonl")}
    assert {"sft", "ppo", "ppo-seed-1", "ppo-human-seed-0", "grpo-seed-1", "dpo-seed-0", "best-of-seed-1", "ppo-oracle"} <= set(held)
    assert {len(rows) for rows in held.values()} == {len(held["sft"])} and held["ppo-seed-1"][0]["seed"] == 1
    assert sum(r["utility"] for r in held["sft"]) / len(held["sft"]) == pytest.approx(report["utility_sft"], abs=1e-3)
    paired = json.loads(run_bench("methods_storyworld.py", "--out", str(tmp_path), "--worlds", "0", "--paired", "ppo,sft", "--component", "utility", timeout=120))
    assert paired["by_world"]["0"]["scenes"] == len(held["sft"]) and paired["interval"][0] <= paired["mean"] <= paired["interval"][1]
    ppo_mean = sum(r["utility_ppo"] for r in methods["ppo"]) / 2
    assert paired["mean"] == pytest.approx(ppo_mean - report["utility_sft"], abs=2e-3)
    try:
        import matplotlib  # noqa: F401  (the [bench] extra)

        assert (tmp_path / "win-vs-kl.png").stat().st_size > 0
    except ImportError:
        assert not (tmp_path / "win-vs-kl.png").exists()
    # --oracle-only on the finished world: new ceiling runs (PPO's, and GRPO's, as the world ran GRPO), everything else
    # of the report kept as it was.
    (world / "ppo-oracle" / "metrics.json").unlink(), (world / "grpo-oracle" / "metrics.json").unlink()
    run_bench("ppo_storyworld.py", "--smoke", "--out", str(world), "--seed", "0", "--oracle-only", timeout=600)
    again = json.loads((world / "report.json").read_text())
    assert again["methods"] == report["methods"] and again["ppo"] == report["ppo"] and again["seeds"] == report["seeds"]
    assert {k: again["phases"][k] for k in user} == {k: report["phases"][k] for k in user} and again["minutes"] == report["minutes"]  # steps reused, minutes kept
    assert (world / "ppo-oracle" / "metrics.json").exists() and 0.0 <= again["oracle"]["win_rate_vs_sft"] <= 1.0
    assert (world / "grpo-oracle" / "metrics.json").exists() and 0.0 <= again["oracle_grpo"]["win_rate_vs_sft"] <= 1.0
    # A world with fewer runs than --seeds gets the missing ones added (--add-seeds), the rest kept.
    again["methods"]["ppo"], again["methods"]["dpo"] = again["methods"]["ppo"][:1], again["methods"]["dpo"][:1]
    (world / "report.json").write_text(json.dumps(again))
    run_bench("methods_storyworld.py", "--smoke", "--worlds", "0", "--seeds", "2", *base, "--out", str(tmp_path), timeout=600)
    added = json.loads((world / "report.json").read_text())
    assert {m: len(r) for m, r in added["methods"].items()} == {m: 2 for m in methods} and added["methods"]["dpo"][1]["seed"] == 1
    assert added["methods"]["grpo"] == report["methods"]["grpo"] and added["oracle"] == again["oracle"] and added["rm"] == report["rm"]
    assert "method_dpo_seed_1" in added["phases"] and 0.0 <= added["methods"]["ppo"][1]["win_rate_vs_sft"] <= 1.0
    assert added["seeds"]["seed"] == [0, 1] and added["seeds"]["win_rate_vs_sft"] == [r["win_rate_vs_sft"] for r in added["methods"]["ppo"]]
    # The yardstick beside the reward model reads the same world.
    run_bench("rm_probe_storyworld.py", str(world), "--ensemble", "rm", "--clip", "clip", "--mix-weights", "0,0.3", "--out", str(tmp_path / "probe.json"), timeout=300)
    probe = json.loads((tmp_path / "probe.json").read_text())[str(world)]
    assert probe["train_pairs"] > 0 and all(0.0 <= probe[k]["vs_labels"] <= 1.0 for k in ("bow", "binding", "entities", "both"))
    ens = probe["ensemble"]
    assert ens["pairs"] <= probe["policy_test_pairs"] and (ens["pairs"] == 0 or ens["ensemble"] == ens["rm"])  # one member: the ensemble is it
    # --clip scores the world's own CLIP as the bench did (its own cache, the same pairs): the same agreement
    clip, signals = probe["clip"]["clip"], report["signals_vs_annotators"]
    assert clip["pairs"] == signals["pairs"] and clip["vs_labels_policy_pairs"] == signals.get("clip"), (clip, signals)
    # --mix-weights: weight 0 is the reward model alone, as the bench scored it (agreement and per-component diagnosis)
    mix = probe["mix"]
    if signals["pairs"]:
        alone, diagnosis = mix["0.0"], report["diagnosis_policy_pairs"]
        assert alone["vs_labels_policy_pairs"] == signals["human"] and set(mix) == {"0.0", "0.3"}
        assert {k: v["mix"] for k, v in alone["vs_utility_by_component"].items()} == {k: v["human"] for k, v in diagnosis.items() if k != "pairs"}
    else:  # the smoke policy's samples can all tie: nothing to score
        assert mix == {"pairs": 0}
    # The two-round DPO methods, added to the finished world without another PPO run: iterative DPO ranked by the
    # reward (rlhf.online_dpo), and a round of simulated votes on the DPO policy's samples, used alone from dpo-seed-0
    # (dpo_round2) or joined to the project's votes, from SFT (dpo_union).
    run_bench("ppo_storyworld.py", "--smoke", "--out", str(world), "--seed", "0", "--add-seeds", "--no-ppo", "--methods",
              "dpo_online,dpo_round2,dpo_union,grpo_union,dpo_soft,dpo_contrast,dpo_oracle", "--ppo-seeds", "1", timeout=900)  # fmt: skip
    two = json.loads((world / "report.json").read_text())
    assert two["sft"] == report["sft"]  # the same SFT policy's greedy stories, evaluated again
    (soft,) = two["methods"]["dpo_soft"]  # DPO on the same export, each pair's target its share of the votes
    assert soft["seed"] == 0 and 0.0 <= soft["win_rate_vs_sft"] <= 1.0
    assert json.loads((world / "dpo-soft-seed-0" / "dpo_config.json").read_text())["aggregate"] == "soft"
    (contrast,) = two["methods"]["dpo_contrast"]  # DPO on the same export and contrast pairs from storyworld's words
    assert contrast["contrast_pairs"] > 0 and 0.0 <= contrast["win_rate_vs_sft"] <= 1.0
    assert json.loads((world / "dpo-contrast-seed-0" / "dpo_config.json").read_text())["contrast_words"] == str(world / "contrast-words.txt")
    (oracle,) = two["methods"]["dpo_oracle"]  # DPO on the same train pairs labelled by the hidden utility (its ceiling)
    assert oracle["oracle_pairs"]["kept"] + oracle["oracle_pairs"]["dropped"] == two["export"]["train"]
    assert (world / "trl-oracle" / "test.jsonl").read_text() == (world / "trl" / "test.jsonl").read_text()  # judged on the votes
    assert json.loads((world / "dpo-oracle-seed-0" / "dpo_config.json").read_text())["data"] == str(world / "trl-oracle")
    assert two["methods"]["ppo"] == added["methods"]["ppo"] and two["methods"]["dpo"] == added["methods"]["dpo"]
    for method in ("dpo_online", "dpo_round2", "dpo_union", "grpo_union"):
        (run,) = two["methods"][method]
        pairs = run["train_pairs"] if method.endswith("_union") else run["round2_pairs"]  # the union methods train on all rounds
        assert run["seed"] == 0 and pairs > 0 and 0.0 <= run["win_rate_vs_sft"] <= 1.0, method
        assert run["train_minutes"] >= two["methods"]["dpo"][0]["train_minutes"]  # round 1 counts too
    online = json.loads((world / "dpo-online-seed-0" / "metrics.json").read_text())
    assert online["rounds"][0]["pairs"] == two["methods"]["dpo_online"][0]["round2_pairs"]
    assert json.loads((world / "dpo-round2-seed-0" / "storypref_policy.json").read_text())["sft_adapter"] == str((world / "dpo-seed-0").resolve())
    grpo3 = json.loads((world / "grpo-union-seed-0" / "ppo_config.json").read_text())  # GRPO from SFT, rewarded by the reward model of all rounds
    assert grpo3["reward_model"] == str(world / "rm-union-seed-0") and grpo3["advantage"] == "grpo" and grpo3["policy"] == str(world / "sft")
    assert json.loads((world / "rm-union-seed-0" / "metrics.json").read_text())["train_pairs"] == two["methods"]["grpo_union"][0]["train_pairs"]
    union = json.loads((world / "dpo-union-seed-0" / "storypref_policy.json").read_text())
    assert union["base"] == str((world / "sft").resolve()) and union["sft_adapter"] is None  # from SFT again, not from round 1
    round3 = len((world / "trl-dpo-seed-0" / "train.jsonl").read_text().splitlines())  # round 3's votes alone (dpo_round2's data)
    assert two["methods"]["dpo_union"][0]["train_pairs"] > max(two["export"]["train"], round3)  # the export of rounds 1 and 2 with them
    # A reward model on all three rounds (--rm-only --rm-data), judged with the run's own on the new round's held-out pairs.
    # It reads who is described how too (rm_entity_features): the setting reaches rlhf.train_rm.
    run_bench("ppo_storyworld.py", "--smoke", "--out", str(world), "--seed", "0", "--rm-only", "rm-union", "--rm-data", "trl-union-seed-0",
              "--set", "rm_entity_features=true", timeout=600)  # fmt: skip
    assert json.loads((world / "rm-union" / "reward_config.json").read_text())["entity_features"]
    assert json.loads((world / "rm" / "reward_config.json").read_text())["entity_features"]  # the bench's default since 2026-12-06
    assert "entity_weights" in json.loads((world / "rm-union" / "metrics.json").read_text())
    rm_union = json.loads((world / "rm-union" / "bench.json").read_text())
    assert rm_union["data"] == "trl-union-seed-0" and rm_union["train_pairs"] == two["methods"]["dpo_union"][0]["train_pairs"]
    for judge in ("this", "run_rm"):
        agreement = rm_union["new_round_pairs"][judge]["human_vs_annotators"]
        assert agreement["pairs"] == 0 or 0.0 <= agreement["human"] <= 1.0, judge
    # PPO and GRPO on that reward model instead of rm/ (--ppo-rm), beside the default's runs, which stay.
    run_bench("ppo_storyworld.py", "--smoke", "--out", str(world), "--seed", "0", "--add-seeds", "--ppo-rm", "rm-union", "--methods", "grpo",
              "--ppo-seeds", "1", timeout=600)  # fmt: skip
    other = json.loads((world / "report.json").read_text())
    (on_union,) = other["methods"]["ppo@rm-union"]
    assert on_union["reward_model"] == "rm-union" and on_union["seed"] == 0 and 0.0 <= on_union["win_rate_vs_sft"] <= 1.0
    assert other["methods"]["ppo"] == two["methods"]["ppo"] and other["methods"]["grpo"] == two["methods"]["grpo"]
    (grpo_union,) = other["methods"]["grpo@rm-union"]
    assert grpo_union["seed"] == 0 and 0.0 <= grpo_union["win_rate_vs_sft"] <= 1.0 and "method_grpo@rm-union_seed_0" in other["phases"]
    assert json.loads((world / "grpo-rm-union-seed-0" / "ppo_config.json").read_text())["reward_model"] == str(world / "rm-union")
    assert json.loads((world / "ppo-rm-union-seed-0" / "ppo_config.json").read_text())["reward_model"] == str(world / "rm-union")
    two = other
    # --add-seeds on a plain run (one PPO run, no method table): its run starts the table, the next seed is added.
    plain = {k: v for k, v in two.items() if k not in ("methods", "seeds")}
    (world / "report.json").write_text(json.dumps(plain))
    run_bench("ppo_storyworld.py", "--smoke", "--out", str(world), "--seed", "0", "--add-seeds", "--ppo-seeds", "2", "--set", "length_debias=0.5",
              timeout=600)  # fmt: skip
    more = json.loads((world / "report.json").read_text())
    assert set(more["methods"]) == {"ppo"} and [r["seed"] for r in more["methods"]["ppo"]] == [0, 1]
    added = more["methods"]["ppo"][1]  # an added run keeps what it was given and what its stories became
    assert added["set"] == ["length_debias=0.5"] and added["components_ppo"]["words"] > 0
    assert json.loads((world / "ppo-seed-1" / "ppo_config.json").read_text())["length_debias"] == 0.5
    assert more["methods"]["ppo"][0] == {k: two["ppo"][k] for k in ("win_rate_vs_sft", "utility_ppo", "kl_to_sft", "train_minutes")} | {"seed": 0}
    assert more["seeds"]["win_rate_vs_sft"] == [r["win_rate_vs_sft"] for r in more["methods"]["ppo"]] and more["ppo"] == two["ppo"]


def test_hidden_utility_blind_to_shapes(tmp_path):
    """The shape-blind judge scores a story with a character's shape wrong as the true story; the whole utility does not.
    It still catches a character the story itself gives two looks."""
    import re

    from bench.ppo_storyworld import hidden_utility, utility_components
    from storyworld.world import make_world

    make_world(tmp_path / "w", 4, seed=3, image_size=(32, 32))
    world = {w["external_id"]: w for w in map(json.loads, (tmp_path / "w" / "world.jsonl").open())}
    item = next(iter(world))
    good = next(c for c in world[item]["candidates"] if c["origin"] == "storyworld/good")
    scene = world[item]["scene"]
    looks = {(e["color"], e["shape"]) for f in scene["frames"] for e in f["entities"]}
    hero = scene["frames"][0]["entities"][0]
    other = next(s for s in ("circle", "square", "triangle", "star", "diamond") if (hero["color"], s) not in looks)  # a look not drawn
    wrong = re.sub(rf"\b{hero['color']} {hero['shape']}\b", f"{hero['color']} {other}", good["text"])
    recorded, good = good["utility"], good["text"]
    assert wrong != good
    assert hidden_utility(world, item, wrong) < hidden_utility(world, item, good) == pytest.approx(recorded, abs=1e-4)
    assert hidden_utility(world, item, wrong, blind_to_shapes=True) == hidden_utility(world, item, good, blind_to_shapes=True)
    # But it reads the words: a story that gives the hero two looks contradicts itself, whatever the frames show.
    two_looks = f"{good} {hero['name']} the {hero['color']} {other} waved."
    blind = {s: utility_components(world, item, s, blind_to_shapes=True) for s in (good, wrong, two_looks)}
    assert blind[good].consistency == blind[wrong].consistency == 1.0  # one look each, of the hero's own color
    assert blind[two_looks].consistency == 0.0  # the only named character, with two looks
    assert utility_components(world, item, two_looks).consistency == 0.0  # as the whole utility judges it


@pytest.mark.timeout(600)
def test_clip_prefix_storyworld_smoke(tmp_path):
    """bench/clip_prefix_storyworld.py --smoke: one tiny world of 5-8 frame scenes, SFT on windows, votes, export and DPO."""
    run_bench("clip_prefix_storyworld.py", "--smoke", "--worlds", "5", "--seeds", "1", "--out", str(tmp_path), timeout=580)
    world = json.loads((tmp_path / "world-5" / "report.json").read_text())
    assert world["export"]["train"] > 0 and world["windows"]["held_out"] > 0 and len(world["dpo"]) == 1
    assert set(world["minutes"]) == {"make_and_clip", "sft", "generate_annotate_export", "evaluate_sft", "dpo_seed_0"}
    summary = json.loads((tmp_path / "report.json").read_text())
    assert 0.0 <= summary["win_rate_median"] <= 1.0 and summary["utility"]["reference"] > 5  # the data's own parts are good stories
    assert {"sft", "dpo", "reference"} == set(summary["clip_score_target_frame"])


@pytest.mark.timeout(600)
def test_feedback_storyworld_smoke(tmp_path):
    """bench/feedback_storyworld.py --smoke: both campaigns through record_vote, four reward models, plain and segment DPO."""
    run_bench("feedback_storyworld.py", "--smoke", "--worlds", "0", "--out", str(tmp_path), timeout=550)
    report = json.loads((tmp_path / "world-0" / "report.json").read_text())
    entry = report["budgets"]["24"]
    pair, rank = entry["campaign"]["pair"], entry["campaign"]["rank"]
    assert pair["answers"] == rank["answers"] == 24 and pair["implied_pairs"] == 24 and rank["implied_pairs"] == 24 * 3  # K = 3
    assert rank["pairs_per_annotator_minute"] > pair["pairs_per_annotator_minute"] > 0 and pair["marks"] > 0
    assert set(entry["rm"]) == {"pairs", "pairs+marks", "ranks", "ranks+marks"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["pairs"] > 0 for r in entry["rm"].values())
    assert entry["rm"]["ranks"]["train_pairs"] > entry["rm"]["pairs"]["train_pairs"]  # a ranking gives several pairs
    assert "eval_span_token_accuracy" in entry["rm"]["pairs+marks"] or "eval_span_token_accuracy" in entry["rm"]["ranks+marks"]
    runs = report["policy"]["runs"]
    assert [r["method"] for r in runs] == ["dpo", "dpo+marks"] and all(0.0 <= r["hallucination_rate"] <= 1.0 for r in runs)
    assert "| 24 | ranks+marks |" in (tmp_path / "table.md").read_text()
