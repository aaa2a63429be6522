"""Procedural scenes: 1-4 frames of shapes in a setting, with a small plot, rendered with PIL.

A scene is pure data (`Scene` → `Frame` → `Entity`) and is fully determined by its seed. Characters
are named shapes ("Pip, a red circle"); objects are small shapes a character may pick up. Across
frames a plot unfolds: a character moves, another arrives and they meet, something is picked up, or
the light changes. `render_frame` draws one frame; the ground truth stays in the dataclasses.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

from PIL import Image, ImageDraw

SETTINGS = {  # setting -> (sky, ground) at day
    "forest": ((150, 200, 235), (34, 110, 50)),
    "sea": ((160, 210, 245), (30, 90, 170)),
    "city": ((180, 190, 205), (110, 110, 115)),
    "desert": ((250, 220, 160), (215, 175, 100)),
    "snow": ((215, 225, 240), (245, 248, 252)),
    "meadow": ((165, 215, 250), (120, 190, 80)),
}
COLORS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 225),
    "green": (20, 160, 60),
    "yellow": (245, 215, 30),
    "purple": (145, 55, 200),
    "orange": (250, 135, 20),
    "pink": (245, 120, 190),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
NAMES = ("Pip", "Momo", "Zed", "Luna", "Bo", "Kit", "Remy", "Tess", "Nina", "Olo")
TIMES = ("day", "night")
EVENTS = ("move", "meet", "pickup", "lights")


@dataclass
class Entity:
    id: str  # char1, char2, obj1: stable across frames
    kind: str  # character | object
    shape: str
    color: str
    size: str  # small | big
    x: float  # centre, as a fraction of the width
    y: float
    name: str | None = None
    held_by: str | None = None  # an object picked up travels with its character

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    def box(self, w: float, h: float) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the square `render_frame` draws it in on a w x h frame, in pixels."""
        s = (0.13 if self.size == "big" else 0.07) * h
        cx, cy = self.x * w, self.y * h
        return cx - s, cy - s, cx + s, cy + s


@dataclass
class Frame:
    setting: str
    time: str
    entities: list[Entity]
    event: str  # start | move | meet | pickup | lights
    actors: list[str] = field(default_factory=list)  # entity ids the event is about

    def entity(self, eid: str) -> Entity:
        return next(e for e in self.entities if e.id == eid)

    def characters(self) -> list[Entity]:
        return [e for e in self.entities if e.kind == "character"]


@dataclass
class Scene:
    id: str
    frames: list[Frame]

    @property
    def setting(self) -> str:
        return self.frames[0].setting

    def all_entities(self) -> dict[str, Entity]:
        """Each entity as last seen, by id."""
        out: dict[str, Entity] = {}
        for frame in self.frames:
            out.update({e.id: e for e in frame.entities})
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        frames = [Frame(**{**f, "entities": [Entity(**e) for e in f["entities"]]}) for f in d["frames"]]
        return cls(d["id"], frames)


def free_values(frame: Frame, e: Entity, attribute: str) -> list[str]:
    """The colors (attribute "color") or shapes that would give `e` a look no entity of `frame` has."""
    present = {(x.color, x.shape) for x in frame.entities}
    if attribute == "color":
        return [c for c in COLORS if (c, e.shape) not in present]
    return [s for s in SHAPES if (e.color, s) not in present]


def _new_entity(rng: random.Random, eid: str, kind: str, used: set[tuple[str, str]], names: list[str]) -> Entity:
    while True:  # every entity in a scene has its own color+shape, so a mention names exactly one
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in used:
            used.add((color, shape))
            break
    name = names.pop() if kind == "character" else None
    size = "big" if kind == "character" else "small"
    return Entity(eid, kind, shape, color, size, rng.uniform(0.15, 0.85), rng.uniform(0.55, 0.8), name)


def make_scene(seed: int | str, n_frames: int | None = None, frames_range: tuple[int, int] = (1, 4)) -> Scene:
    """A deterministic scene for `seed`."""
    rng = random.Random(f"scene:{seed}")
    n_frames = n_frames or rng.randint(*frames_range)
    names = rng.sample(NAMES, 3)
    used: set[tuple[str, str]] = set()
    entities = [_new_entity(rng, "char1", "character", used, names)]
    if rng.random() < 0.5:
        entities.append(_new_entity(rng, "char2", "character", used, names))
    if rng.random() < 0.6:
        entities.append(_new_entity(rng, "obj1", "object", used, names))
    frame = Frame(rng.choice(list(SETTINGS)), rng.choice(TIMES), entities, "start", [entities[0].id])
    frames = [frame]
    for _ in range(n_frames - 1):
        frame = _next_frame(rng, frame, used, names)
        frames.append(frame)
    return Scene(str(seed), frames)


def _next_frame(rng: random.Random, prev: Frame, used: set, names: list[str]) -> Frame:
    entities = [replace(e) for e in prev.entities]
    hero = entities[0]
    possible = ["move", "lights"]
    if len([e for e in entities if e.kind == "character"]) < 2 or any(e.kind == "character" and e.id != hero.id for e in entities):
        possible.append("meet")
    if any(e.kind == "object" and e.held_by is None for e in entities):
        possible.append("pickup")
    event = rng.choice(possible)
    time, actors = prev.time, [hero.id]
    if event == "move":
        hero.x = min(0.85, max(0.15, hero.x + rng.choice([-1, 1]) * rng.uniform(0.25, 0.4)))
    elif event == "lights":
        time = "night" if prev.time == "day" else "day"
    elif event == "meet":
        other = next((e for e in entities if e.kind == "character" and e.id != hero.id), None)
        if other is None:
            other = _new_entity(rng, "char2", "character", used, names)
            entities.append(other)
        other.x = min(0.9, hero.x + 0.18) if hero.x < 0.5 else max(0.1, hero.x - 0.18)
        actors.append(other.id)
    elif event == "pickup":
        obj = next(e for e in entities if e.kind == "object" and e.held_by is None)
        obj.held_by = hero.id
        actors.append(obj.id)
    for e in entities:  # held things travel with their holder
        if e.held_by:
            holder = next(h for h in entities if h.id == e.held_by)
            e.x, e.y = holder.x + 0.07, holder.y - 0.12
    return Frame(prev.setting, time, entities, event, actors)


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(c * factor) for c in rgb)  # type: ignore[return-value]


def drawing_order(frame: Frame) -> list[Entity]:
    """The entities in the order `render_frame` draws them: characters, then objects on top."""
    return sorted(frame.entities, key=lambda e: e.kind != "character")


def render_frame(frame: Frame, size: tuple[int, int] = (128, 96)) -> Image.Image:
    """Draw `frame`: sky and ground of the setting, darker at night with a moon, then the shapes."""
    w, h = size
    sky, ground = SETTINGS[frame.setting]
    if frame.time == "night":
        sky, ground = _shade(sky, 0.3), _shade(ground, 0.45)
    img = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, int(h * 0.5), w, h], fill=ground)
    r = max(3, h // 12)
    if frame.time == "night":
        draw.ellipse([w - 3 * r, r, w - r, 3 * r], fill=(240, 240, 210))
    else:
        draw.ellipse([w - 3 * r, r, w - r, 3 * r], fill=(255, 225, 60))
    for e in drawing_order(frame):
        _draw_shape(draw, e, w, h)
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, e: Entity, w: int, h: int) -> None:
    box = list(e.box(w, h))
    s, cx, cy = (box[2] - box[0]) / 2, e.x * w, e.y * h
    color, outline = COLORS[e.color], (255, 255, 255) if e.color == "black" else (0, 0, 0)
    if e.shape == "circle":
        draw.ellipse(box, fill=color, outline=outline)
    elif e.shape == "square":
        draw.rectangle(box, fill=color, outline=outline)
    elif e.shape == "triangle":
        draw.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=color, outline=outline)
    elif e.shape == "diamond":
        draw.polygon([(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)], fill=color, outline=outline)
    else:  # star
        draw.regular_polygon((cx, cy, s), 5, fill=color, outline=outline)
        draw.regular_polygon((cx, cy, s * 0.9), 3, rotation=36, fill=color)
