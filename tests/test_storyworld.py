"""storyworld: determinism, the utility's ordering of flaws, simulated agreement and bias, the CLI, tiny CLIP."""

import hashlib
import itertools
import json
import random
from dataclasses import replace

import pytest

from storyworld import STYLES, Knobs, SimAnnotator, components, default_pool, make_scene, make_world, pairwise_agreement, write_story
from storyworld.__main__ import main
from storyworld.grammar import IMAGE_ONLY_FLAWS, random_knobs, sentences_well_formed
from storyworld.scene import Scene, render_frame
from storyworld.utility import WEIGHTS, strip_tags
from storyworld.world import fresh_frames, world_frames


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_make_is_deterministic_per_seed(tmp_path):
    make_world(tmp_path / "a", 12, seed=7)
    make_world(tmp_path / "b", 12, seed=7)
    make_world(tmp_path / "c", 12, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_world_files(tmp_path):
    make_world(tmp_path, 20, seed=1, frames=(2, 3))
    items = [json.loads(x) for x in (tmp_path / "items.jsonl").open()]
    world = [json.loads(x) for x in (tmp_path / "world.jsonl").open()]
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").open()]
    assert len(items) == len(world) == len(sft) == 20
    for item, truth in zip(items, world):
        assert 2 <= len(item["image_paths"]) <= 3 and all((tmp_path / p).is_file() for p in item["image_paths"])
        assert len({c["text"] for c in item["candidates"]}) == 4  # distinct candidates
        assert item["style"] in STYLES and item["style"] in item["instruction"]
        assert [c["text"] for c in item["candidates"]] == [c["text"] for c in truth["candidates"]]
    utilities = [c["utility"] for t in world for c in t["candidates"]]
    assert max(utilities) - min(utilities) > 3  # varied quality
    assert set(sft[0]) == {"item_id", "image_paths", "instruction", "style", "context", "story"}
    for item, truth, example in zip(items, world, sft):  # the story so far names the cast, the hero first
        cast = Scene.from_dict(truth["scene"]).all_entities()
        names = [cast[c].name for c in ("char1", "char2") if c in cast]
        assert item["context"] == truth["context"] == example["context"]
        assert item["context"] == (f"{names[0]} set off alone." if len(names) == 1 else f"{names[0]} and {names[1]} were old friends.")
    assert [s["item_id"] for s in sft] == [i["external_id"] for i in items]  # so stories can be scored against the world


FLAWS = {
    "wrong_attr": Knobs(wrong_attr=0.6),
    "hallucinate": Knobs(hallucinate=1),
    "omit": Knobs(omit=1.0),
    "repeat": Knobs(repeat=2),
    "incoherent": Knobs(incoherent=True),
    "short": Knobs(length="short"),
    "long": Knobs(length="long"),
    "style": None,  # filled per scene: another style than the asked one
}


@pytest.mark.parametrize("flaw", list(FLAWS))
def test_utility_ranks_flawless_above_each_flaw(flaw):
    applied = 0
    for seed in range(300):
        scene, style = make_scene(seed), STYLES[seed % 4]
        good = write_story(scene, style, Knobs(), random.Random(seed))
        knobs = FLAWS[flaw] or Knobs(style=STYLES[(seed + 1) % 4])
        bad = write_story(scene, style, knobs, random.Random(seed))
        if bad == good:  # the flaw had nothing to act on (e.g. no bystander to omit)
            continue
        applied += 1
        assert components(scene, good, style).utility > components(scene, bad, style).utility, (flaw, seed, bad)
    assert applied > 100


def test_flawless_story_components_by_hand():
    scene = make_scene(3, 3)
    story = write_story(scene, "spooky")
    comp = components(scene, story, "spooky")
    assert (comp.grounding_precision, comp.grounding_recall, comp.consistency, comp.style_match, comp.length) == (1, 1, 1, 1, 1)
    # The same story asked as "calm": every style word is spooky, so the style match is 0.
    assert components(scene, story, "calm").style_match == 0
    # Tags carry no weight of their own.
    tagged = write_story(scene, "spooky", Knobs(tags=True))
    assert "<gdi image1>" in tagged and "<gdo char1>" in tagged and "<" not in strip_tags(tagged)
    assert components(scene, tagged, "spooky").utility == pytest.approx(components(scene, strip_tags(tagged), "spooky").utility)


def test_utility_by_hand_on_free_text():
    scene = make_scene(3, 3)  # Bo the yellow diamond meets Pip the blue triangle in a meadow at night
    cast = {e.label for e in scene.all_entities().values()}
    assert cast == {"yellow diamond", "blue triangle"} and scene.setting == "meadow"
    comp = components(scene, "Bo the red circle sat in the city.", "calm")
    # Mentions: "red circle" wrong, "Bo" right, "city" wrong → precision 1/3; Bo named → cast 1/2.
    assert comp.grounding_precision == pytest.approx(1 / 3)
    assert comp.grounding_recall == pytest.approx(0.6 * 1 / 2 + 0.2 * 0 + 0.2 * 0)
    assert comp.consistency == 1.0  # Bo has one look, though not Bo's: the words agree with themselves (precision counts it)
    two_looks = components(scene, "Bo the red circle rested. Bo the yellow diamond rested.", "calm")
    assert two_looks.consistency == 0.0  # a name with two looks contradicts itself, in the words alone
    assert comp.fluency == 0.0 and comp.utility == 0.0  # "sat" is not in the grammar's language: the one sentence is garbled


def test_every_grammar_story_is_fluent_and_broken_text_is_not():
    for seed in range(400):  # every knob, every style: fluency is 1, so the grammar's candidates keep their utility
        rng = random.Random(seed)
        story = write_story(make_scene(seed), STYLES[seed % 4], random_knobs(rng, seed % 3 / 2), rng)
        assert all(sentences_well_formed(strip_tags(story))), story
    # Recombined phrases read fine; a missing shape, a cut-off story and word salad do not.
    assert sentences_well_formed("A small green diamond gleamed like a hidden treasure. Luna the red star was there.") == [True, True]
    assert sentences_well_formed("Pip the red gleamed like a silly. Bravely, one sunny day in the meadow,") == [False, False]
    assert sentences_well_formed("Something rather giggling. Then night fell, and") == [False, False]
    scene = make_scene(3, 3)
    story = write_story(scene, "spooky")
    cut = story[: story.rindex(".") + 1] + " Then Bo the"  # one unfinished sentence after the others
    n = len(sentences_well_formed(story))
    full, partial = components(scene, story, "spooky"), components(scene, cut, "spooky")
    assert partial.fluency == pytest.approx(n / (n + 1))
    assert partial.utility == pytest.approx(partial.fluency * sum(w * getattr(partial, k) for k, w in WEIGHTS.items()))
    assert full.fluency == 1.0 and partial.utility < full.utility
    assert components(scene, "In the eerie hush, one moonlit night in the meadow,", "spooky").utility == 0.0  # a fragment alone


IMAGE_FLAWS = {"false-look": Knobs(false_look=1), "phantom": Knobs(phantom=1), "wrong-setting": Knobs(wrong_setting=True),
               "wrong-time": Knobs(wrong_time=True)}  # fmt: skip
TEXT_COMPONENTS = ("consistency", "style_match", "fluency", "length", "non_repetition")


@pytest.mark.parametrize("flaw", IMAGE_ONLY_FLAWS)
def test_image_only_flaws_read_perfectly_and_cost_only_grounding(flaw):
    """The story stays fluent, self-consistent and in style; only the grounding components drop."""
    applied = 0
    for seed in range(300):
        scene, style = make_scene(seed), STYLES[seed % 4]
        knobs = Knobs(**{**IMAGE_FLAWS[flaw].__dict__, "image_seed": seed}).applied_to(scene)
        if not knobs.image_flaws():
            continue  # e.g. wrong-time on a scene that shows both day and night
        good = write_story(scene, style, Knobs(), random.Random(seed))
        bad = write_story(scene, style, knobs, random.Random(seed))
        g, b = components(scene, good, style), components(scene, bad, style)
        applied += 1
        assert b.fluency == 1.0 and b.consistency == g.consistency == 1.0 and b.style_match == g.style_match, (flaw, bad)
        assert b.grounding_precision < g.grounding_precision and b.grounding_recall <= g.grounding_recall, (flaw, bad)
        assert b.utility < g.utility
        if flaw != "phantom":  # the same words but the flawed ones: length and repetition as they were
            assert len(bad.split()) == len(good.split()) and b.length == g.length
            assert b.non_repetition == pytest.approx(g.non_repetition, abs=0.03)  # a swapped word can make one trigram repeat
    assert applied > 150


def test_an_image_only_flaw_changes_only_its_own_words():
    scene = make_scene(5)  # Momo the black diamond meets Olo the blue star in the desert; the light changes
    base = Knobs(image_seed=3)
    story = write_story(scene, "calm", base, random.Random(5))
    look = write_story(scene, "calm", Knobs(false_look=1, image_seed=3), random.Random(5))
    place = write_story(scene, "calm", Knobs(wrong_setting=True, image_seed=3), random.Random(5))
    both = write_story(scene, "calm", Knobs(false_look=1, wrong_setting=True, image_seed=3), random.Random(5))
    changed = lambda a, b: [(x, y) for x, y in zip(a.split(), b.split()) if x != y]  # noqa: E731
    assert changed(story, place) and all(x.strip(".,") == "desert" for x, _ in changed(story, place))
    assert len({y for _, y in changed(story, look)}) == 1  # one entity, one wrong word, the same in every mention
    assert changed(look, both) == changed(story, place)  # adding a flaw leaves the others as they were
    assert Knobs(wrong_time=True).applied_to(scene).wrong_time is False  # the scene shows day and night: no flaw to make


def test_world_image_twins_and_independent_image_flaws(tmp_path):
    make_world(tmp_path, 120, seed=3)
    world = [json.loads(x) for x in (tmp_path / "world.jsonl").open()]
    items = [json.loads(x) for x in (tmp_path / "items.jsonl").open()]
    twins = [(w, i) for w, i in zip(world, items) if w["slices"]]
    assert 40 <= len(twins) <= 80  # about half the items
    for w, item in twins:
        assert item["slices"] == w["slices"] == {"image-only": [[0, 3]]}
        a, b = w["candidates"][0], w["candidates"][3]
        new = [f for f in b["flaws"] if f not in a["flaws"]]
        assert len(new) == 1 and new[0] in IMAGE_ONLY_FLAWS and [f for f in a["flaws"] if f not in b["flaws"]] == []
        assert b["utility"] < a["utility"] and all(a[k] == b[k] for k in ("consistency", "style_match", "fluency"))
    # Image-only flaws come from their own quality draw: the text-visible flaws say nothing about them.
    text, image = [], []
    for w in world:
        for k, c in enumerate(w["candidates"]):
            if not (w["slices"] and k == 3):
                text.append(sum(f not in IMAGE_ONLY_FLAWS for f in c["flaws"]))
                image.append(sum(f in IMAGE_ONLY_FLAWS for f in c["flaws"]))
    n = len(text)
    mt, mi = sum(text) / n, sum(image) / n
    cov = sum((x - mt) * (y - mi) for x, y in zip(text, image)) / n
    r = cov / ((sum((x - mt) ** 2 for x in text) / n) ** 0.5 * (sum((y - mi) ** 2 for y in image) / n) ** 0.5)
    assert abs(r) < 0.12 and 0.25 < sum(1 for y in image if y) / n < 0.75


def _simulate(pool, pairs, rng, per_pair=2):
    labels = []
    for ua, ub in pairs:
        row = []
        for ann in rng.sample(pool, per_pair):
            left = rng.choice("ab")
            said = ann.choose(ua, ub, rng) if left == "a" else ann.choose(ub, ua, rng)
            row.append("tie" if said == "tie" else "a" if (said == "left") == (left == "a") else "b")
        labels.append(row)
    return labels


def test_default_pool_agrees_about_75_percent(tmp_path):
    make_world(tmp_path, 400, seed=3)
    world = [json.loads(x) for x in (tmp_path / "world.jsonl").open()]
    pairs = [(w["candidates"][i]["utility"], w["candidates"][j]["utility"]) for w in world
             for i, j in itertools.combinations(range(4), 2)]  # fmt: skip
    rng = random.Random(0)
    agreement = pairwise_agreement(_simulate(default_pool(5), rng.sample(pairs, 2000), rng))
    assert 0.72 <= agreement <= 0.78, agreement


def test_position_bias_shows_in_biased_annotators():
    rng = random.Random(1)
    fair, biased = SimAnnotator("fair"), SimAnnotator("biased", left_bias=1.0)
    pairs = [(rng.uniform(0, 10), rng.uniform(0, 10)) for _ in range(4000)]
    def left_rate(ann):  # noqa: E306
        said = [ann.choose(u, v, rng) for u, v in pairs]
        return sum(s == "left" for s in said) / sum(s != "tie" for s in said)
    assert abs(left_rate(fair) - 0.5) < 0.03
    assert left_rate(biased) > 0.55
    assert any(a.left_bias > 0 for a in default_pool(5)) and any(a.careless > 0 for a in default_pool(5))


def test_ties_within_threshold():
    assert SimAnnotator("a", tie_threshold=0.5).choose(5.0, 5.3, random.Random(0)) == "tie"


def test_cli_make_annotate_score_and_ingest(tmp_path, capsys):
    assert main(["make", "--out", str(tmp_path / "w"), "--items", "10", "--seed", "2", "--frames", "1-2"]) == 0
    prefs = tmp_path / "w" / "prefs.jsonl"
    assert main(["annotate", "--world", str(tmp_path / "w"), "--out", str(prefs), "--votes-per-pair", "3", "--pairs-per-item", "2"]) == 0
    lines = [json.loads(x) for x in prefs.open()]
    assert len(lines) == 10 * 2 * 3
    assert {"annotator", "shown_left", "preference", "response_a", "response_b", "image_paths"} <= set(lines[0])
    # score: the mean over the candidates equals the truth recorded in world.jsonl.
    world = [json.loads(x) for x in (tmp_path / "w" / "world.jsonl").open()]
    stories = tmp_path / "stories.jsonl"
    stories.write_text("".join(json.dumps({"item_id": w["external_id"], "story": c["text"]}) + "\n" for w in world for c in w["candidates"]))
    capsys.readouterr()
    assert main(["score", "--world", str(tmp_path / "w"), "--stories", str(stories)]) == 0
    report = json.loads(capsys.readouterr().out)
    truth = [c["utility"] for w in world for c in w["candidates"]]
    assert report["n"] == 40 and report["mean_utility"] == pytest.approx(sum(truth) / 40, abs=1e-3)
    # Both files ingest into a storypref database.
    from annotate.ingest import ingest
    from db import open_db

    factory = open_db(f"sqlite:///{tmp_path}/db.sqlite")[1]
    _, stats = ingest(factory, str(tmp_path / "w" / "items.jsonl"), "sw", media_root=tmp_path / "m")
    assert (stats.items_added, stats.candidates_added, stats.comparisons_added) == (10, 40, 60)
    _, stats = ingest(factory, str(prefs), "sw-votes", media_root=tmp_path / "m")
    assert stats.votes_added == 60


def test_long_scenes_with_frame_tags_cut_into_windows_scored_against_their_frame(tmp_path, capsys):
    """--frames 5-8 --frame-tags: each SFT story tags every frame once; a window's part `ID/T` is scored
    as a story of frame T alone."""
    from rlhf.stories import read_examples

    assert main(["make", "--out", str(tmp_path / "w"), "--items", "6", "--seed", "4", "--frames", "5-8", "--frame-tags"]) == 0
    sft = [json.loads(x) for x in (tmp_path / "w" / "sft.jsonl").open()]
    for row in sft:
        n = len(row["image_paths"])
        assert 5 <= n <= 8 and [f"<gdi image{i}>" in row["story"] for i in range(1, n + 2)] == [True] * n + [False]
    windows = read_examples(str(tmp_path / "w" / "sft.jsonl"), window=4)
    assert len(windows) == sum(len(r["image_paths"]) - 4 for r in sft)
    world = {w["external_id"]: w for w in map(json.loads, (tmp_path / "w" / "world.jsonl").open())}
    e = windows[0]
    story_id, t = e.item_id.split("/")
    scene = Scene.from_dict(world[story_id]["scene"])
    expected = components(Scene("x", [scene.frames[int(t) - 1]]), e.story, world[story_id]["style"]).utility
    (tmp_path / "parts.jsonl").write_text(json.dumps({"item_id": e.item_id, "story": e.story}) + "\n")
    capsys.readouterr()
    assert main(["score", "--world", str(tmp_path / "w"), "--stories", str(tmp_path / "parts.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["mean_utility"] == pytest.approx(expected, abs=1e-4)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"item_id": f"{story_id}/9", "story": "x"}) + "\n")  # no frame 9
    with pytest.raises(ValueError, match="ID/T"):
        main(["score", "--world", str(tmp_path / "w"), "--stories", str(tmp_path / "bad.jsonl")])
    with pytest.raises(SystemExit):
        main(["make", "--out", str(tmp_path / "x"), "--frames", "5-9"])


def test_swapped_caption_changes_one_attribute_and_is_false():
    from storyworld.clip import swapped_caption
    from storyworld.grammar import describe_frame

    rng = random.Random(0)
    for seed in range(40):
        frame = make_scene(seed).frames[-1]
        true = describe_frame(frame)
        present = {(e.color, e.shape) for e in frame.entities}
        for k in range(len(true)):
            for attribute in (("setting", "time") if k == 0 else ("color", "shape")):
                neg = swapped_caption(frame, k, rng, attribute)
                assert neg not in true  # false of this frame, not merely another entity's caption
                changed = [a for a, b in zip(true[k].rstrip(".").split(), neg.rstrip(".").split()) if a != b]
                assert len(changed) == 1 and len(neg.split()) == len(true[k].split()), (true[k], neg)
                if k:
                    words = neg.rstrip(".").split()
                    color, shape = words[-7], words[-6]  # "A [small] COLOR SHAPE in the SETTING at TIME"
                    assert (color, shape) not in present


def test_tiny_clip_beats_chance(tmp_path):
    pytest.importorskip("open_clip")
    from storyworld.clip import load_clip, train_clip

    make_world(tmp_path / "w", 300, seed=5)
    report = train_clip(tmp_path / "w", tmp_path / "clip", epochs=20, batch_size=64, max_minutes=10)  # 200 steps
    retrieval, attributes = report["retrieval"], report["attributes"]
    assert retrieval["text_to_image"] >= 5 * retrieval["chance"], report
    # It reads colors, not only the setting: the true color of an entity beats the swapped ones
    # (150 held-out entities; 1.5x chance is 2.4 standard deviations above it). How well it reads
    # them on a full-size world is a benchmark figure (docs/BENCHMARKS.md), not asserted here.
    assert attributes["color"] >= 1.5 * attributes["color_chance"], report
    # It loads back through open_clip's own local-dir path, the way a hub model would.
    import torch
    from PIL import Image

    model, preprocess, tokenizer = load_clip(str(tmp_path / "clip"))
    image = preprocess(Image.open(next((tmp_path / "w" / "images").iterdir()))).unsqueeze(0)
    with torch.no_grad():
        assert model.encode_image(image).shape == (1, 64) and model.encode_text(tokenizer(["a red circle"])).shape == (1, 64)


def test_tiny_clip_trains_on_fresh_scenes_too(tmp_path):
    pytest.importorskip("open_clip")
    from storyworld.clip import train_clip

    make_world(tmp_path / "w", 40, seed=5)
    plain = train_clip(tmp_path / "w", tmp_path / "plain", epochs=1, batch_size=16, seed=1)
    fresh = train_clip(tmp_path / "w", tmp_path / "fresh", epochs=1, batch_size=16, seed=1, fresh_scenes=20)
    assert fresh["fresh_scenes"] == 20 and plain["fresh_scenes"] == 0
    assert fresh["steps"] > plain["steps"] and fresh["train_pairs"] > plain["train_pairs"]  # the new scenes' frames were trained on
    assert fresh["held_out_frames"] == plain["held_out_frames"]  # and the report stays on the world's own held-out frames


def test_zoom_box_and_look_targets_by_hand():
    pytest.importorskip("torchvision")
    import torch
    from torchvision.ops import roi_align

    from storyworld.clip import LOOKS, look_targets, zoom_box
    from storyworld.scene import SETTINGS, Entity, Frame, render_frame

    big = Entity("c1", "character", "circle", "red", "big", 0.5, 0.6, "Pip")  # a square of half-side 0.13 * 96 = 12.48
    # twice its height, 4:3 like the frame, centred on it: half-height 24.96, half-width 33.28
    assert zoom_box(big, (128, 96), 2.0) == pytest.approx((30.72, 32.64, 97.28, 82.56))
    # near the left edge it moves right to stay inside; too large, it is the whole frame
    assert zoom_box(replace(big, x=0.1), (128, 96), 2.0) == pytest.approx((0.0, 32.64, 66.56, 82.56))
    assert zoom_box(replace(big, x=0.05), (128, 96), 4.0) == pytest.approx((0.0, 0.0, 128.0, 96.0))
    # the crop, as train_clip takes it with roi_align, shows the entity at its centre; the circle fills
    # pi * r^2 / (3r * 4r) = pi / 12 = 0.26 of it (a little less: its black outline)
    frame = Frame(next(iter(SETTINGS)), "day", [big], "start")
    img = torch.tensor(list(render_frame(frame).getdata()), dtype=torch.float32).T.reshape(1, 3, 96, 128)
    crop = roi_align(img, torch.tensor([[0, *zoom_box(big, (128, 96), 1.5)]]), (64, 64), 1.0, 2, aligned=True)[0]
    red = (crop[0] > 180) & (crop[1] < 80) & (crop[2] < 80)
    assert red[32, 32] and 0.20 < red.float().mean() < 0.262, red.float().mean()

    y = look_targets([[big, Entity("o1", "object", "star", "blue", "small", 0.2, 0.7)], []])
    assert y.shape == (2, len(LOOKS)) and y.sum().item() == 2
    assert y[0, LOOKS.index(("red", "circle"))] == 1 and y[0, LOOKS.index(("blue", "star"))] == 1 and y[1].sum() == 0


def test_tiny_clip_zoom_and_look_head(tmp_path):
    pytest.importorskip("open_clip")
    from storyworld.clip import train_clip

    make_world(tmp_path / "w", 40, seed=5)
    for bad, message in (({"zoom": 1.5}, "--zoom 1.5"), ({"look_weight": -1.0}, "--look-weight -1.0")):
        with pytest.raises(ValueError, match=message):
            train_clip(tmp_path / "w", tmp_path / "bad", epochs=1, batch_size=16, **bad)
    assert not (tmp_path / "bad").exists()  # refused before any training or writing
    report = train_clip(tmp_path / "w", tmp_path / "clip", epochs=1, batch_size=16, seed=1, zoom=0.5, look_weight=1.0)
    assert report["zoom"] == 0.5 and report["look_weight"] == 1.0 and report["steps"] >= 1
    saved = json.loads((tmp_path / "clip" / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["embed_dim"] == 64  # the look head is not part of the saved model


def test_vit_labels_and_look_accuracy_by_hand():
    import torch

    from storyworld.scene import Entity, Frame
    from storyworld.vision import LABELS, LOOKS, frame_labels, look_accuracy

    red_circle = Entity("char1", "character", "circle", "red", "big", 0.3, 0.6, "Pip")
    blue_star = Entity("obj1", "object", "star", "blue", "small", 0.6, 0.7)
    frame = Frame("forest", "night", [red_circle, blue_star], "start", ["char1"])
    # LOOKS is colors x shapes in order: red circle 0, blue (color 1) star (shape 3) 1*5+3; then 6 settings,
    # 2 times (40-47); then the 8 colors alone (red 48, blue 49) and the 5 shapes alone (circle 56, star 59).
    assert frame_labels(frame) == [0, 8, 40, 47, 48, 49, 56, 59]
    assert len(LOOKS) == 40
    assert len(LABELS) == 61
    logits = torch.zeros(1, len(LABELS))  # the head's width; look_accuracy reads the LOOKS columns
    logits[0, LOOKS.index(("red", "circle"))] = 2.0  # right
    logits[0, LOOKS.index(("green", "star"))] = 3.0  # beats blue for the star: wrong color
    logits[0, LOOKS.index(("blue", "square"))] = 1.0  # the star's shape: star (0) loses to square: wrong shape
    logits[0, LOOKS.index(("red", "diamond"))] = -1.0  # the circle's shape: circle (2) beats every other (0, -1): right
    acc = look_accuracy(logits, [frame])
    assert acc["color"] == 0.5 and acc["shape"] == 0.5 and acc["entities"] == 2
    assert acc["color_chance"] == 1 / 8  # no other entity shares a shape, so all 8 colors are options
    assert acc["shape_chance"] == 1 / 5  # nor a color: all 5 shapes


def test_patch_labels_by_hand():
    from storyworld.scene import Entity, Frame
    from storyworld.vision import BACKGROUND, LOOKS, patch_labels

    # On a 128 x 96 frame a 4 x 4 grid has patch centres at x 16, 48, 80, 112 and y 12, 36, 60, 84.
    # The big red circle's square (half side 0.13 * 96 = 12.48 px) around (38.4, 57.6) holds the centre (48, 60):
    # patch row 2, column 1. The small blue star's (half side 6.72) around (76.8, 67.2) holds no centre;
    # its own centre patch (row 2, column 2) carries it.
    red_circle = Entity("char1", "character", "circle", "red", "big", 0.3, 0.6, "Pip")
    blue_star = Entity("obj1", "object", "star", "blue", "small", 0.6, 0.7)
    labels = patch_labels(Frame("forest", "day", [red_circle, blue_star], "start", ["char1"]), 4, 4, (128, 96))
    expected = [BACKGROUND] * 16
    expected[2 * 4 + 1], expected[2 * 4 + 2] = LOOKS.index(("red", "circle")), LOOKS.index(("blue", "star"))
    assert labels == expected
    # An object is drawn over a character, whatever their order in the frame: the patch shows the object.
    held = Entity("obj1", "object", "star", "blue", "small", 0.3, 0.6)
    assert patch_labels(Frame("forest", "day", [held, red_circle], "pickup", ["char1"]), 4, 4, (128, 96))[9] == LOOKS.index(("blue", "star"))


def test_fresh_frames_are_new_scenes_drawn_like_the_world():
    a, b = fresh_frames(20, seed=1, image_size=(64, 48)), fresh_frames(20, seed=1, image_size=(64, 48))
    assert len(a) >= 20 and all(im.size == (64, 48) for im, _ in a)
    assert [f for _, f in a] == [f for _, f in b] and a[0][0].tobytes() == b[0][0].tobytes()  # the seed fixes them
    assert [f for _, f in fresh_frames(20, seed=2)] != [f for _, f in a]
    assert a[0][0].tobytes() == render_frame(a[0][1], (64, 48)).tobytes()  # drawn by the world's own renderer


def test_tiny_vit_reads_colors_and_loads_as_a_hub_vit(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    from storyworld.vision import train_vit

    make_world(tmp_path / "w", 300, seed=5)
    train, held_frames = world_frames(tmp_path / "w")
    report = train_vit(tmp_path / "w", tmp_path / "vit", max_steps=300, max_minutes=10, fresh_scenes=100)  # steps, not minutes, set the model
    assert report["train_frames"] == len(train) + len(fresh_frames(100, 0)) and report["held_out_frames"] == len(held_frames)
    held = report["held_out"]
    assert held["color"] >= 1.5 * held["color_chance"] and held["setting"] >= 3 * held["setting_chance"], report
    assert held["patch_look"] >= 3 * held["patch_look_chance"], report  # the patch tokens say which look is where
    model = AutoModel.from_pretrained(tmp_path / "vit")  # the way rlhf.sft --vision_encoder loads it
    assert type(model).__name__ == "ViTModel" and AutoImageProcessor.from_pretrained(tmp_path / "vit").size["height"] == 64


def test_ranking_annotator_orders_pairs_as_bradley_terry_does():
    """Plackett-Luce: any two stories are ordered i before j with σ((u_i − u_j) / T), whatever else is ranked."""
    import math

    ann, rng = SimAnnotator("r", temperature=0.65, tie_threshold=0.0), random.Random(0)
    u = [2.0, 1.5, 1.0, 0.2]
    runs = [ann.rank(u, rng) for _ in range(6000)]
    for i, j in itertools.combinations(range(4), 2):
        seen = sum(r[i] < r[j] for r in runs) / len(runs)
        assert seen == pytest.approx(1 / (1 + math.exp(-(u[i] - u[j]) / 0.65)), abs=0.02)
    tied = SimAnnotator("t", tie_threshold=0.1).rank([1.0, 1.05, 3.0], random.Random(1))
    assert tied[0] == tied[1] and tied[2] == 1  # close utilities next to each other share a rank


def test_flaw_spans_mark_exactly_the_wrong_mentions():
    from storyworld.utility import flaw_spans, hallucination_rate, mentions

    scene = make_scene("spans-1")
    clean = write_story(scene, "calm", Knobs(), random.Random(0))
    assert flaw_spans(scene, clean) == [] and hallucination_rate(scene, clean) == 0.0 and mentions(scene, clean)
    for knobs in (Knobs(false_look=1, image_seed=3), Knobs(phantom=1, image_seed=4), Knobs(wrong_setting=True, image_seed=5),
                  Knobs(hallucinate=2), Knobs(incoherent=True, tags=True)):  # fmt: skip
        story = write_story(scene, "calm", knobs, random.Random(0))
        spans = flaw_spans(scene, story)
        comp = components(scene, story, "calm")
        assert spans, knobs
        for start, end, label in spans:
            words = story[start:end].split()
            assert label in ("hallucinated", "contradicts") and words and "<" not in story[start:end]
        found = mentions(scene, story)
        wrong = sum(f == "hallucinated" for *_, f in found)
        assert hallucination_rate(scene, story) == pytest.approx(wrong / len(found))
        if not knobs.incoherent:  # a contradicting look is counted by consistency, not as a wrong mention
            assert hallucination_rate(scene, story) == pytest.approx(1 - comp.grounding_precision)
