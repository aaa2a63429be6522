"""A story grammar for scenes, with knobs for the flaws annotators dislike.

`write_story(scene, style, knobs, rng)` writes one sentence group per frame from templates with a
per-style vocabulary. `Knobs` turns on exactly the flaws the seed projects complain about: wrong
colors or shapes and invented things (grounding), repeated sentences, a character that changes
name or color (incoherence), the wrong style, too short or too long, and missing mentions. With
`tags=True` the story carries StoryReasoning grounding tags: `<gdi imageN>` per frame and
`<gdo charN>Name</gdo>` per entity.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, replace

from storyworld.scene import COLORS, NAMES, SETTINGS, SHAPES, Entity, Frame, Scene

STYLES = ("adventurous", "funny", "spooky", "calm")
STYLE_DESCRIPTIONS = {
    "adventurous": "a bold, daring quest full of brave heroes and treasure",
    "funny": "a silly, goofy tale where everyone giggles and wobbles",
    "spooky": "an eerie, ghostly tale of creeping shadows and whispers",
    "calm": "a peaceful, gentle story where everything rests quietly",
}
VOCAB = {
    "adventurous": {
        "open": ["On a daring quest", "Bravely", "Ready for adventure"],
        "intro": ["set out boldly", "charged ahead bravely", "began a daring quest"],
        "present": ["stood ready like a brave hero", "was eager for adventure"],
        "object": ["gleamed like treasure", "waited like a hidden treasure"],
        "move": ["dashed boldly", "charged bravely", "raced daringly"],
        "meet": ["and they vowed to explore together", "and the two heroes joined the quest"],
        "pickup": ["like a treasure won on the quest", "and held it high bravely"],
        "lights": ["but the heroes pressed on bravely", "and the quest went on boldly"],
        "filler": ["The quest was long and daring.", "Every brave hero needs a bold heart."],
    },
    "funny": {
        "open": ["In a very silly mood", "Giggling loudly", "Once, rather goofily"],
        "intro": ["wobbled about giggling", "bounced around goofily", "tripped over a silly pebble"],
        "present": ["giggled at nothing at all", "made a goofy face"],
        "object": ["sat there looking silly", "wobbled all by itself"],
        "move": ["wobbled goofily", "hopped sillily", "tumbled giggling"],
        "meet": ["and they both giggled and wobbled", "and they told a silly joke"],
        "pickup": ["and giggled so hard it wobbled", "and wore it like a silly hat"],
        "lights": ["and everyone giggled at the silly change", "which tickled everyone goofily"],
        "filler": ["It was all terribly silly.", "Everyone giggled and wobbled some more."],
    },
    "spooky": {
        "open": ["In the eerie hush", "Among creeping shadows", "With a ghostly shiver"],
        "intro": ["crept forward slowly", "shivered in the shadows", "whispered to the eerie silence"],
        "present": ["lurked in the shadows", "watched with a ghostly stare"],
        "object": ["lay there eerily", "glinted in the shadows"],
        "move": ["crept eerily", "slunk through the shadows", "shivered onward"],
        "meet": ["and they whispered in the eerie gloom", "and a ghostly chill ran through them"],
        "pickup": ["as the shadows whispered", "with a trembling shiver"],
        "lights": ["and the shadows crept closer", "and an eerie whisper rose"],
        "filler": ["The shadows whispered eerily.", "Something ghostly crept nearby."],
    },
    "calm": {
        "open": ["Peacefully", "In a quiet moment", "Gently and slowly"],
        "intro": ["rested quietly", "drifted along gently", "breathed the peaceful air"],
        "present": ["rested peacefully nearby", "waited quietly and gently"],
        "object": ["rested quietly on the ground", "lay gently in the grass"],
        "move": ["drifted gently", "strolled quietly", "glided peacefully"],
        "meet": ["and they sat together peacefully", "and they shared a quiet smile"],
        "pickup": ["and held it gently", "and smiled peacefully"],
        "lights": ["and all was peaceful and quiet", "and the world rested gently"],
        "filler": ["Everything was gentle and quiet.", "The peaceful moment lasted softly."],
    },
}
STYLE_WORDS = {
    "adventurous": {"daring", "quest", "bold", "boldly", "bravely", "brave", "hero", "heroes", "adventure", "charged",
                    "explore", "treasure", "eager", "raced", "daringly", "dashed"},
    "funny": {"silly", "giggled", "giggling", "giggle", "goofy", "goofily", "wobbled", "wobble", "joke", "tickled",
              "sillily", "bounced", "hopped", "tumbled", "tripped"},
    "spooky": {"eerie", "eerily", "shadows", "ghostly", "shiver", "shivered", "crept", "creeping", "whispered",
               "whisper", "whispers", "lurked", "gloom", "chill", "slunk", "trembling"},
    "calm": {"peaceful", "peacefully", "quiet", "quietly", "gently", "gentle", "rested", "drifted", "calm",
             "softly", "glided", "strolled", "breathed", "smiled"},
}  # fmt: skip
TIME_PHRASE = {"day": "one sunny day", "night": "one moonlit night"}
LIGHTS = {"day": "Then the sun rose", "night": "Then night fell"}


IMAGE_ONLY_FLAWS = ("false-look", "phantom", "wrong-setting", "wrong-time")


@dataclass
class Knobs:
    """Which flaws to put in a story. The defaults write a flawless story.

    The first group leaves traces in the words (a name with two looks, a repeated sentence, the
    wrong style words). The image-only group writes a story that reads perfectly, fluent and
    self-consistent, and contradicts only the frames; its choices come from their own random
    stream (`image_seed`), so a story with and without them is the same text elsewhere.
    """

    wrong_attr: float = 0.0  # chance that each entity mention gets a wrong color or shape
    hallucinate: int = 0  # number of invented things mentioned
    omit: float = 0.0  # chance that each non-hero mention is left out
    repeat: int = 0  # number of sentences said twice
    incoherent: bool = False  # a character changes color (and maybe name) in a later sentence
    style: str | None = None  # write in this style instead of the asked one
    length: str = "normal"  # short | normal | long
    tags: bool = False  # StoryReasoning <gdi>/<gdo> tags
    # Image-only flaws: visible only in the frames.
    false_look: int = 0  # entities given one wrong color or shape, the same in every mention
    phantom: int = 0  # invented objects introduced as if they were in the picture ("A small red star ...")
    wrong_setting: bool = False  # the whole story set in another setting
    wrong_time: bool = False  # day and night swapped throughout (a scene whose light never changes)
    image_seed: int = 0  # the random stream of the image-only choices

    def flaws(self, asked_style: str) -> list[str]:
        out = []
        if self.wrong_attr or self.hallucinate:
            out.append("grounding")
        if self.omit:
            out.append("omission")
        if self.repeat:
            out.append("repetition")
        if self.incoherent:
            out.append("incoherence")
        if self.style and self.style != asked_style:
            out.append("style")
        if self.length != "normal":
            out.append(f"length-{self.length}")
        return out + self.image_flaws()

    def image_flaws(self) -> list[str]:
        """The image-only flaws turned on, by name (`IMAGE_ONLY_FLAWS`)."""
        on = (self.false_look, self.phantom, self.wrong_setting, self.wrong_time)
        return [name for name, flag in zip(IMAGE_ONLY_FLAWS, on) if flag]

    def applied_to(self, scene: Scene) -> Knobs:
        """These knobs with the image-only flaws that cannot act on `scene` turned off.

        A short story (a bare caption) names no looks, no phantom and no time, so only a wrong
        setting acts on it; `wrong_time` needs a scene whose light never changes (with both day and
        night in the pictures, either word is right somewhere).
        """
        short = self.length == "short"
        return replace(self, false_look=0 if short else self.false_look, phantom=0 if short else self.phantom,
                       wrong_time=self.wrong_time and not short and len({f.time for f in scene.frames}) == 1)  # fmt: skip


def random_knobs(rng: random.Random, quality: float, image_quality: float | None = None) -> Knobs:
    """Knobs whose flaws are more likely the lower `quality` (0..1) is.

    `image_quality` draws the image-only flaws the same way, independently of the others; None
    (the default) draws none, and draws nothing from `rng` for them.
    """
    bad = 1.0 - quality
    knobs = Knobs(
        wrong_attr=rng.choice([0.0, 0.0, 0.3, 0.6]) * (rng.random() < bad),
        hallucinate=int(rng.random() < bad * 0.6) * rng.randint(1, 2),
        omit=0.5 * (rng.random() < bad * 0.5),
        repeat=int(rng.random() < bad * 0.6) * rng.randint(1, 3),
        incoherent=rng.random() < bad * 0.4,
        style=rng.choice(STYLES) if rng.random() < bad * 0.5 else None,
        length=rng.choice(["short", "long"]) if rng.random() < bad * 0.4 else "normal",
        tags=rng.random() < 0.2,
    )
    if image_quality is not None:
        image_bad = 1.0 - image_quality
        knobs.false_look = int(rng.random() < image_bad * 0.6) * rng.randint(1, 2)
        knobs.phantom = int(rng.random() < image_bad * 0.4)
        knobs.wrong_setting = rng.random() < image_bad * 0.3
        knobs.wrong_time = rng.random() < image_bad * 0.3
        knobs.image_seed = rng.randrange(2**31)
    return knobs


class _Writer:
    def __init__(self, scene: Scene, style: str, knobs: Knobs, rng: random.Random):
        self.scene, self.knobs, self.rng = scene, knobs, rng
        self.v = VOCAB[knobs.style or style]
        self.tag_ids = {eid: f"char{i + 1}" for i, eid in enumerate(scene.all_entities())}
        actors = {a for f in scene.frames for a in f.actors}
        # Omission leaves out bystanders only: the ones no event mentions again.
        self.omitted = {eid for eid in scene.all_entities() if eid not in actors and rng.random() < knobs.omit}
        # Each image-only flaw draws from a stream of its own, so the rest of the story is the same
        # text, and adding one such flaw leaves the others as they were.
        image_rng = lambda kind: random.Random(f"image:{scene.id}:{knobs.image_seed}:{kind}")  # noqa: E731
        self.looks = {eid: (e.color, e.shape) for eid, e in scene.all_entities().items()}
        taken = set(self.looks.values())
        looks_rng = image_rng("false-look")
        for eid in looks_rng.sample(sorted(self.looks), min(knobs.false_look, len(self.looks))):
            color, shape = self.looks[eid]
            if looks_rng.random() < 0.5:  # one attribute wrong; never a look another entity has
                options = [(c, shape) for c in COLORS if (c, shape) not in taken]
            else:
                options = [(color, x) for x in SHAPES if (color, x) not in taken]
            self.looks[eid] = looks_rng.choice(options)
            taken.add(self.looks[eid])
        self.taken = taken
        self.phantom_rng = image_rng("phantom")
        settings = [x for x in SETTINGS if x != scene.setting]
        self.setting = image_rng("setting").choice(settings) if knobs.wrong_setting else scene.setting

    def time(self, frame: Frame) -> str:
        return ("night" if frame.time == "day" else "day") if self.knobs.wrong_time else frame.time

    def pick(self, key: str) -> str:
        return self.rng.choice(self.v[key])

    def label(self, e: Entity) -> str:
        color, shape = self.looks[e.id]  # its true look, or the false one an image-only flaw gave it
        if self.rng.random() >= self.knobs.wrong_attr:
            return f"{color} {shape}"
        # A wrong color or a wrong shape, never the true look of another entity of the scene.
        taken = {(x.color, x.shape) for x in self.scene.all_entities().values()}
        if self.rng.random() < 0.5:
            looks = [(c, e.shape) for c in COLORS if (c, e.shape) not in taken]
        else:
            looks = [(e.color, s) for s in SHAPES if (e.color, s) not in taken]
        color, shape = self.rng.choice(looks)
        return f"{color} {shape}"

    def name(self, e: Entity) -> str:
        text = e.name or f"the {self.looks[e.id][1]}"
        return f"<gdo {self.tag_ids[e.id]}>{text}</gdo>" if self.knobs.tags and e.name else text

    def frame_sentences(self, i: int, frame: Frame) -> list[str]:
        hero = frame.entity(frame.actors[0])
        others = [e for e in frame.entities if e.id not in frame.actors and e.held_by is None]
        if self.knobs.length == "short":  # a bare caption: no cast, no events, no style
            return [f"{self.name(hero)} was there."] if i else [f"{self.name(hero)} was in the {self.setting}."]
        if i == 0:
            out = [f"{self.pick('open')}, {TIME_PHRASE[self.time(frame)]} in the {self.setting}, "
                   f"{self.name(hero)} the {self.label(hero)} {self.pick('intro')}."]  # fmt: skip
        elif frame.event == "move":
            out = [f"{self.name(hero)} the {self.label(hero)} {self.pick('move')} across the {self.setting}."]
        elif frame.event == "meet":
            other = frame.entity(frame.actors[1])
            out = [f"{self.name(hero)} met {self.name(other)} the {self.label(other)} {self.pick('meet')}."]
        elif frame.event == "pickup":
            obj = frame.entity(frame.actors[1])
            out = [f"{self.name(hero)} picked up the small {self.label(obj)} {self.pick('pickup')}."]
        else:
            out = [f"{LIGHTS[self.time(frame)]}, and {self.name(hero)} the {self.label(hero)} {self.pick('move')} on."]
        if i == 0:  # introduce the rest of the cast once
            for e in others:
                if e.id in self.omitted:
                    continue
                if e.kind == "character":
                    out.append(f"{self.name(e)} the {self.label(e)} {self.pick('present')}.")
                else:
                    out.append(f"A small {self.label(e)} {self.pick('object')}.")
        if self.knobs.length == "long":
            out += [self.pick("filler"), f"The {self.setting} stayed just as it was."]
            out += [self.pick("filler")]
        return out


def write_story(scene: Scene, style: str, knobs: Knobs | None = None, rng: random.Random | None = None, frame_tags: bool = False) -> str:
    """A story for `scene` asked in `style`, with the flaws `knobs` turns on; `frame_tags` wraps each
    frame's sentences in a `<gdi imageN>` tag (as `knobs.tags` does, without the object tags)."""
    knobs = knobs or Knobs()
    rng = rng or random.Random(f"story:{scene.id}:{style}")
    w = _Writer(scene, style, knobs, rng)
    frames = [w.frame_sentences(i, f) for i, f in enumerate(scene.frames)]
    cast = scene.all_entities()
    for _ in range(knobs.phantom if knobs.length != "short" else 0):  # introduced as the real objects are
        # Drawn among looks no real entity has (a false look may take one of them: then another).
        color, shape = w.phantom_rng.choice(sorted((c, s) for c in COLORS for s in SHAPES
                                                   if (c, s) not in {(e.color, e.shape) for e in cast.values()}))  # fmt: skip
        if (color, shape) in w.taken:
            color, shape = next(look for look in sorted((c, s) for c in COLORS for s in SHAPES) if look not in w.taken)
        w.taken.add((color, shape))
        used = " ".join(frames[0])
        phrases = [p for p in w.v["object"] if p not in used] or w.v["object"]
        frames[0].append(f"A small {color} {shape} {w.phantom_rng.choice(phrases)}.")
    for _ in range(knobs.hallucinate):  # something that is not in any frame
        taken = {(e.color, e.shape) for e in cast.values()}
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken])
        spot = rng.randrange(len(frames))
        article = "An" if color[0] in "aeiou" else "A"
        frames[spot].append(f"{article} {color} {shape} {w.pick('present')}.")
    if knobs.incoherent:
        hero = scene.frames[0].entity(scene.frames[0].actors[0])
        other_color = rng.choice([c for c in COLORS if c != hero.color])
        new_name = rng.choice([n for n in NAMES if n not in {e.name for e in cast.values()}])
        name = hero.name if rng.random() < 0.5 else new_name
        frames[-1].append(f"Then {name} the {other_color} {hero.shape} {w.pick('move')} home.")
        if name == hero.name:
            frames[-1].append(f"{hero.name} the {hero.color} {hero.shape} {w.pick('present')}.")
    for _ in range(knobs.repeat):
        spot = rng.randrange(len(frames))
        frames[spot].append(rng.choice(frames[spot]))
    parts = [" ".join(s) for s in frames]
    if knobs.tags or frame_tags:
        parts = [f"<gdi image{i + 1}>{p}</gdi>" for i, p in enumerate(parts)]
    return " ".join(parts)


_SLOTS = {**{n.lower(): "NAME" for n in NAMES}, **{c: "COLOR" for c in COLORS}, **{x: "SHAPE" for x in SHAPES},
          **{x: "SETTING" for x in SETTINGS}}  # fmt: skip
_TOKEN = re.compile(r"[a-z]+|,")


def _tokens(text: str) -> list[str]:
    return [_SLOTS.get(t, t) for t in _TOKEN.findall(text.lower())]


@functools.cache
def _grammar_bigrams() -> frozenset[tuple[str, str]]:
    """Every word pair `write_story` can put side by side in a sentence, with names, colors, shapes and settings as slots."""
    def v(key: str) -> list[str]:
        return [p.rstrip(".") for voc in VOCAB.values() for p in voc[key]]

    name = ["Pip", "the circle"]  # one of each kind stands for all: _tokens turns names, colors, shapes, settings into slots
    shapes = [  # each sentence shape as a sequence of parts, each part a list of alternatives
        [v("open"), [","], list(TIME_PHRASE.values()), ["in the forest ,"], name, ["the red circle"], v("intro")],
        [name, ["the red circle"], v("move"), ["across the forest"]],
        [name, ["met"], name, ["the red circle"], v("meet")],
        [name, ["picked up the small red circle"], v("pickup")],
        [list(LIGHTS.values()), [", and"], name, ["the red circle"], v("move"), ["on"]],
        [name, ["the red circle"], v("present")],
        [["a small red circle"], v("object")],
        [v("filler")],
        [["the forest stayed just as it was"]],
        [name, ["was there", "was in the forest"]],
        [["a red circle", "an orange circle"], v("present")],
        [["then"], name, ["the red circle"], v("move"), ["home"]],
    ]
    pairs = set()
    for parts in shapes:
        seqs = [[_tokens(alt) for alt in part] for part in parts]
        ends = [["<s>"]]
        for alts in seqs:
            for alt in alts:
                for last in {e[-1] for e in ends}:
                    pairs.add((last, alt[0]))
                pairs.update(zip(alt, alt[1:]))
            ends = alts
        pairs.update((e[-1], "</s>") for e in ends)
    return frozenset(pairs)


_PIECE = re.compile(r"[^.!?]+[.!?]*")


def sentences_well_formed(text: str) -> list[bool]:
    """Split `text` (tags already stripped) into sentences; for each, whether it reads as the grammar's language.

    A sentence is well formed when it ends in a full stop and every pair of neighbouring words
    (names, colors, shapes and settings as slots) is one the grammar writes somewhere: "gleamed like
    a hidden treasure" passes, recombined from two phrases; "Pip the red gleamed like a silly" does
    not, nor a trailing piece with no full stop (a story cut off mid-sentence). The facts in the
    slots do not matter here; grounding judges them.
    """
    bigrams, out = _grammar_bigrams(), []
    for piece in _PIECE.findall(text):
        body = piece.strip()
        if not body.strip(".!? "):
            continue
        words = ["<s>", *_tokens(body), "</s>"]
        out.append(body.endswith((".", "!", "?")) and all(pair in bigrams for pair in zip(words, words[1:])))
    return out


def describe_frame(frame: Frame) -> list[str]:
    """Plain factual sentences about one frame: the captions a tiny CLIP learns from."""
    out = [f"A {frame.setting} at {frame.time}."]
    for e in frame.entities:
        size = "small " if e.kind == "object" else ""
        out.append(f"A {size}{e.color} {e.shape} in the {frame.setting} at {frame.time}.")
    return out


__all__ = ["STYLES", "STYLE_DESCRIPTIONS", "STYLE_WORDS", "Knobs", "SETTINGS", "describe_frame", "random_knobs", "sentences_well_formed", "write_story"]
