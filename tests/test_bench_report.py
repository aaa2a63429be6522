"""bench/ppo_storyworld.py's report merge (add-on runs on one world keep each other's results), and its relabelling of an
export by the hidden utility (DPO's ceiling), and bench/methods_storyworld.py's table."""

from __future__ import annotations

import json
import multiprocessing

from bench.ppo_storyworld import merge_report, relabel_by_utility


def _append_runs(out, key: str, n: int) -> None:
    for i in range(n):
        merge_report(out, lambda report: report.setdefault("methods", {}).setdefault(key, []).append(i))


def test_merge_report_keeps_what_another_run_wrote_since(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"methods": {"ppo": [{"seed": 0}]}, "sft": {"utility": 7.0}}))
    snapshot = json.loads((tmp_path / "report.json").read_text())  # what a run read when it began
    merge_report(tmp_path, lambda r: r["methods"].__setitem__("ppo@rm-contrast", [{"seed": 0}]))  # another run, meanwhile
    runs = [*snapshot["methods"]["ppo"], {"seed": 1}]
    merged = merge_report(tmp_path, lambda r: r["methods"].__setitem__("ppo", runs))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == merged == {"methods": {"ppo": [{"seed": 0}, {"seed": 1}], "ppo@rm-contrast": [{"seed": 0}]}, "sft": {"utility": 7.0}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report.lock", "report.json"]  # no temporary file left


def test_merge_report_two_processes_lose_nothing(tmp_path):
    merge_report(tmp_path, lambda r: r.update(methods={}))  # a report that does not exist yet is started
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_runs, args=(tmp_path, key, 40)) for key in ("ppo", "ppo@rm-contrast")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["methods"] == {"ppo": list(range(40)), "ppo@rm-contrast": list(range(40))}


def test_relabel_by_utility_by_hand():
    scores = {"good": 9.0, "fair": 8.0, "also fair": 8.0, "poor": 7.0}
    rows = [
        {"item_id": "s1", "chosen": "good", "rejected": "poor", "tie": False, "aspects": {"fluency": "chosen"}, "margin": 2.0},
        {"item_id": "s2", "chosen": "poor", "rejected": "fair", "tie": False, "spans": {"chosen": [], "rejected": []}, "margin": 1.0},
        {"item_id": "s3", "chosen": "fair", "rejected": "also fair", "tie": False},  # the utility scores them level: dropped
        {"item_id": "s4", "chosen": "fair", "rejected": "good", "tie": True},  # the annotators tied; the utility prefers "good"
    ]
    kept, counts = relabel_by_utility(rows, lambda item_id, text: scores[text])
    assert counts == {"kept": 3, "flipped": 2, "dropped": 1}
    assert kept == [
        {"item_id": "s1", "chosen": "good", "rejected": "poor", "tie": False, "margin": 2.0},
        {"item_id": "s2", "chosen": "fair", "rejected": "poor", "tie": False, "margin": 1.0},
        {"item_id": "s4", "chosen": "good", "rejected": "fair", "tie": False},
    ]
    assert rows[1]["chosen"] == "poor"  # the caller's rows are not changed
    # Conversational rows (the bench's export) are scored on their text and swapped whole.
    said = {"chosen": [{"role": "assistant", "content": "poor"}], "rejected": [{"role": "assistant", "content": "good"}]}
    kept, counts = relabel_by_utility([{"item_id": "s5", **said, "tie": False}], lambda item_id, text: scores[text])
    assert counts == {"kept": 1, "flipped": 1, "dropped": 0}
    assert kept == [{"item_id": "s5", "chosen": said["rejected"], "rejected": said["chosen"], "tie": False}]


def test_method_table_adds_runs_on_other_reward_models():
    """bench/methods_storyworld.py's table: a method run on another reward model (grpo@NAME) gets its own row, after the
    methods and before the ceilings, with its per-world median."""
    from bench.methods_storyworld import table

    run = lambda w, kl: {"win_rate_vs_sft": w, "utility_ppo": 8.0, "kl_to_sft": kl}  # noqa: E731
    worlds = {
        7: {"methods": {"grpo": [run(0.5, 1.0)], "grpo@rm-b": [run(0.7, 2.0), run(0.6, 3.0)]}, "oracle_grpo": run(0.8, 2.5)},
        8: {"methods": {"grpo": [run(0.4, 1.0)], "grpo@rm-b": [run(0.9, 4.0)]}},
    }
    rows, text = table(worlds)
    assert [r["method"] for r in rows] == ["grpo", "grpo@rm-b", "grpo on the hidden utility (ceiling)"]
    assert rows[1]["win_rate_by_world"] == {7: 0.65, 8: 0.9} and rows[1]["win_rate_median"] == 0.775 and rows[1]["kl_max"] == 4.0
    assert "| grpo@rm-b | 0.65 (0.70 / 0.60) | 0.90 | **0.78** |" in text


def test_paired_difference_by_hand():
    """bench/methods_storyworld.py --paired: per scene, A averaged over its runs minus B, on the scenes every run holds;
    the pooled mean and a bootstrap interval with scenes resampled within each world."""
    import pytest

    from bench.methods_storyworld import paired_difference

    rows = lambda **v: [{"item_id": k, "grounding_precision": x} for k, x in v.items()]  # noqa: E731
    worlds = {
        1: ([rows(s1=1.0, s2=0.5), rows(s1=0.0, s2=0.5)], [rows(s1=0.25, s2=0.5, s3=1.0)]),  # s3: B's alone, not compared
        2: ([rows(s9=0.8)], [rows(s9=0.2)]),
    }
    out = paired_difference(worlds, "grounding_precision", resamples=4000)
    # World 1: A's runs average 0.5 on s1 and 0.5 on s2; minus B: 0.25 and 0.0. World 2: 0.6.
    assert out["by_world"] == {1: {"mean": 0.125, "scenes": 2}, 2: {"mean": 0.6, "scenes": 1}}
    assert out["mean"] == pytest.approx((0.25 + 0.0 + 0.6) / 3, abs=1e-4) and out["scenes"] == 3
    # Resampling world 1's two scenes gives sums 0, 0.25 or 0.5 (¼, ½, ¼); world 2 always 0.6: the pooled means
    # are 0.2, 0.2833, 0.3667, so the 2.5th and 97.5th percentiles are the two ends.
    assert out["interval"] == [pytest.approx(0.2, abs=1e-4), pytest.approx(1.1 / 3, abs=1e-4)]
    with pytest.raises(ValueError, match="world 2: B has no runs"):
        paired_difference({2: ([rows(s9=0.8)], [])}, "grounding_precision")
    with pytest.raises(ValueError, match="world 3: the runs share no held-out scene"):
        paired_difference({3: ([rows(a=1.0)], [rows(b=1.0)])}, "grounding_precision")


def test_run_files_name_each_methods_runs(tmp_path):
    from bench.methods_storyworld import run_files

    held = tmp_path / "held-out"
    held.mkdir()
    for name in ("sft", "ppo", "ppo-seed-1", "ppo-human-seed-0", "ppo-human-seed-1", "ppo-oracle", "grpo-seed-0"):
        (held / f"{name}.jsonl").write_text("")
    assert [f.stem for f in run_files(tmp_path, "ppo")] == ["ppo", "ppo-seed-1"]  # not ppo-human-*, not the oracle
    assert [f.stem for f in run_files(tmp_path, "ppo_human")] == ["ppo-human-seed-0", "ppo-human-seed-1"]
    assert [f.stem for f in run_files(tmp_path, "sft")] == ["sft"] and run_files(tmp_path, "rloo") == []


def test_rm_probe_scores_each_story_once():
    """`rm_probe_storyworld.py --mix-weights` scores the same pairs for every weight: its wrapper hands back the reward's
    own scores, in order, and sends each story (frames, prompt, text) through the reward once."""
    import torch

    from bench.rm_probe_storyworld import _ScoredOnce

    calls = []

    def reward(images, instructions, contexts, styles, stories, update=False):
        calls.append(list(stories))
        return None, {"human": torch.tensor([float(len(s)) for s in stories]), "clip": torch.tensor([s.count("a") / 2 for s in stories])}

    reward.weights = {"human": 1.0, "clip": 0.3}
    once = _ScoredOnce(reward)
    args = ([["x.png"], ["y.png"], ["x.png"], ["y.png"]], ["i"] * 4, ["c"] * 4, ["s"] * 4, ["aa", "abc", "aa", "aa"])
    _, first = once(*args)
    _, again = once(*args)
    assert calls == [["aa", "abc", "aa"]]  # "aa" on x.png twice in the batch, scored once; "aa" on y.png is another story
    assert first["human"].tolist() == again["human"].tolist() == [2.0, 3.0, 2.0, 2.0]
    assert first["clip"].tolist() == [1.0, 0.5, 1.0, 1.0] and once.weights == reward.weights
