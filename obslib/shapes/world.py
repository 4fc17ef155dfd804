"""The shapes world: a deterministic procedural renderer of captioned images.

A *scene* is one or two objects (shape, colour, size) on a background; two objects stand in a
spatial relation that the caption names ("a small red circle to the left of a large blue square").
Every image is rendered from its scene with a seeded random layout on a token-aligned lattice of
positions, so ground truth is exact.

Labels are *canonical*: for two objects, slot A is the left (horizontal) or top (vertical) object,
slot B the other. "X to the right of Y" and "Y to the left of X" are the same canonical scene.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
}
SIZES = {"small": 0.22, "large": 0.38}  # object extent as a share of the image side
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
DEFAULT_BACKGROUND = "black"  # not named in captions
RELATIONS = ("to the left of", "to the right of", "above", "below")
ARRANGEMENTS = ("horizontal", "vertical")

# Attribute combinations that never occur in training scenes.
# Colour pairings (two objects whose colours training never shows together: the binding test, as in GenEval's
# colour attribution) are part of the held-out split, on which the model's quality bar is measured.
HELDOUT_COLOUR_PAIRS = ({"red", "cyan"}, {"green", "magenta"}, {"blue", "yellow"})
# An object colour on a background training never shows it on is a separate, harder split
# ("unseen_background"): reported beside the held-out numbers, not part of them.
UNSEEN_OBJECT_BACKGROUND = {("yellow", "white"), ("blue", "gray")}
HELDOUT_RANDOM_SHARE = {1: 0.2, 2: 0.05}  # extra random unseen prompts, by object count
SPLIT_SEED = 1234
SPLITS = ("train", "heldout", "unseen_background")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; for two, ``relation`` says where objects[0] is relative to objects[1]."""

    objects: tuple[Obj, ...]
    relation: str | None = None
    background: str = DEFAULT_BACKGROUND

    def caption(self) -> str:
        text = self.objects[0].phrase()
        if len(self.objects) == 2:
            text += f" {self.relation} {self.objects[1].phrase()}"
        if self.background != DEFAULT_BACKGROUND:
            text += f" on a {self.background} background"
        return text

    def canonical(self) -> tuple[str | None, Obj, Obj | None]:
        """(arrangement, slot A, slot B): A is the left/top object."""
        if len(self.objects) == 1:
            return None, self.objects[0], None
        a, b = self.objects
        arrangement = "horizontal" if self.relation in ("to the left of", "to the right of") else "vertical"
        if self.relation in ("to the right of", "below"):
            a, b = b, a
        return arrangement, a, b

    def labels(self) -> dict[str, int]:
        """Integer labels for the evaluator's heads (index -1 = absent)."""
        arrangement, a, b = self.canonical()
        lab = {
            "count": len(self.objects) - 1,
            "background": list(BACKGROUNDS).index(self.background),
            "arrangement": -1 if arrangement is None else ARRANGEMENTS.index(arrangement),
        }
        for slot, obj in (("a", a), ("b", b)):
            lab[f"{slot}_shape"] = -1 if obj is None else SHAPES.index(obj.shape)
            lab[f"{slot}_colour"] = -1 if obj is None else list(COLOURS).index(obj.colour)
            lab[f"{slot}_size"] = -1 if obj is None else list(SIZES).index(obj.size)
        return lab


ALL_OBJECTS = tuple(Obj(s, c, z) for s in SHAPES for c in COLOURS for z in SIZES)
LABEL_HEADS = {
    "count": 2,
    "background": len(BACKGROUNDS),
    "arrangement": len(ARRANGEMENTS),
    "a_shape": len(SHAPES),
    "a_colour": len(COLOURS),
    "a_size": len(SIZES),
    "b_shape": len(SHAPES),
    "b_colour": len(COLOURS),
    "b_size": len(SIZES),
}

_CAPTION_PARSE: dict[str, Scene] | None = None


def all_scenes() -> list[Scene]:
    scenes = [Scene((o,), None, bg) for bg in BACKGROUNDS for o in ALL_OBJECTS]
    for bg in BACKGROUNDS:
        for a, b in itertools.permutations(ALL_OBJECTS, 2):
            for rel in RELATIONS:
                scenes.append(Scene((a, b), rel, bg))
    return scenes


def novelty(scene: Scene) -> str | None:
    """The combination training never shows that the scene holds: "background" (an object colour on a
    background never seen with it), "colour pairing", or None."""
    if any((o.colour, scene.background) in UNSEEN_OBJECT_BACKGROUND for o in scene.objects):
        return "background"
    if len(scene.objects) == 2 and {o.colour for o in scene.objects} in HELDOUT_COLOUR_PAIRS:
        return "colour pairing"
    return None


def is_novel_combination(scene: Scene) -> bool:
    """True when the scene holds an attribute combination that training never shows."""
    return novelty(scene) is not None


def splits() -> dict[str, list[Scene]]:
    """Deterministic splits of the world's scenes: ``train``; ``heldout`` = novel colour pairings + random
    unseen prompts; ``unseen_background`` = scenes with an object colour on a background training never
    shows it on.

    The two evaluation lists are ordered: singles and pairs interleaved (1 single per 5 pairs while singles
    last), then shuffled within that pattern, so the first N prompts are a fair sample.
    """
    rng = random.Random(SPLIT_SEED)
    train, held = [], {1: [], 2: []}
    for scene in all_scenes():
        n = len(scene.objects)
        if is_novel_combination(scene) or rng.random() < HELDOUT_RANDOM_SHARE[n]:
            held[n].append(scene)
        else:
            train.append(scene)
    rng.shuffle(held[1])
    rng.shuffle(held[2])
    ordered, singles, pairs = [], list(held[1]), list(held[2])
    while singles or pairs:
        if singles:
            ordered.append(singles.pop())
        for _ in range(5):
            if pairs:
                ordered.append(pairs.pop())
    return {"train": train,
            "heldout": [s for s in ordered if novelty(s) != "background"],
            "unseen_background": [s for s in ordered if novelty(s) == "background"]}


def prompts(split: str, n: int | None = None) -> list[str]:
    """The first ``n`` captions of a split (train prompts in a fixed shuffled order)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    scenes = splits()[split]
    if split == "train":
        scenes = list(scenes)
        random.Random(SPLIT_SEED + 1).shuffle(scenes)
    captions = [s.caption() for s in scenes]
    return captions if n is None else captions[:n]


def parse_caption(caption: str) -> Scene:
    """Inverse of ``Scene.caption`` (raises ValueError for text outside the world's grammar)."""
    global _CAPTION_PARSE
    if _CAPTION_PARSE is None:
        _CAPTION_PARSE = {s.caption(): s for s in all_scenes()}
    try:
        return _CAPTION_PARSE[caption.strip()]
    except KeyError:
        raise ValueError(f"caption {caption!r} is not in the shapes world's grammar") from None


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        k = r * 0.85
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "cross":
        a, b = r * 0.35, r
        return [
            (cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
            (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
            (cx - b, cy - a), (cx - a, cy - a),
        ]
    raise ValueError(f"shape={shape!r}: must be one of {SHAPES}")


# Object centres sit on a lattice aligned with the denoiser's tokens (VAE x4 * patch 2 = 8 px per token),
# at token centres: every shape has one appearance per size in token space, not 64 sub-token variants.
GRID_STEP = 8
# For two objects the cross-axis offset is at most one lattice step, always less than the main-axis gap,
# so "to the left of" never also reads as "above".
MAX_CROSS_STEPS = 1


def lattice(r: float, size: int = IMAGE_SIZE) -> list[int]:
    """Lattice centres (pixels) at which an object of radius ``r`` lies fully inside the image."""
    return [c for c in range(GRID_STEP // 2, size, GRID_STEP) if r + 1 <= c <= size - r - 1]


def layout(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE, free: bool = False) -> list[tuple[float, float, float]]:
    """Random lattice centres and radii (pixels) consistent with the scene's relation.

    ``free=True`` is the off-lattice placement the evaluator's classifier is trained on (so that it reads
    generated images whose objects drift off the lattice): centres anywhere, slot A in the first half of
    the main axis, slot B in the second, both jittered along the whole cross axis.
    """
    radii = [SIZES[o.size] * size / 2 for o in scene.objects]
    if len(scene.objects) == 1:
        r = radii[0]
        if free:
            return [(rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1), r)]
        cells = lattice(r, size)
        return [(float(rng.choice(cells)), float(rng.choice(cells)), r)]
    arrangement, _, _ = scene.canonical()
    first_is_a = scene.relation in ("to the left of", "above")
    ra, rb = (radii[0], radii[1]) if first_is_a else (radii[1], radii[0])
    if free:
        half = size / 2
        a_main, b_main = rng.uniform(ra + 1, half - 1), rng.uniform(half + 1, size - rb - 1)
        a_cross, b_cross = rng.uniform(ra + 1, size - ra - 1), rng.uniform(rb + 1, size - rb - 1)
    else:
        # main axis: A before B with a visible gap; cross axis: B within MAX_CROSS_STEPS lattice steps of A
        pairs = [(ca, cb) for ca in lattice(ra, size) for cb in lattice(rb, size)]
        a_main, b_main = map(float, rng.choice([(ca, cb) for ca, cb in pairs if cb - ca >= ra + rb + 2]))
        a_cross, b_cross = map(float, rng.choice([(ca, cb) for ca, cb in pairs
                                                  if abs(cb - ca) <= MAX_CROSS_STEPS * GRID_STEP]))
    if arrangement == "horizontal":
        pa, pb = (a_main, a_cross, ra), (b_main, b_cross, rb)
    else:
        pa, pb = (a_cross, a_main, ra), (b_cross, b_main, rb)
    return [pa, pb] if first_is_a else [pb, pa]


def render(scene: Scene, seed: int, size: int = IMAGE_SIZE, supersample: int = 4, free: bool = False) -> np.ndarray:
    """Render a scene to an (size, size, 3) uint8 array; identical for identical (scene, seed, free)."""
    rng = random.Random(seed)
    big = size * supersample
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj, (cx, cy, r) in zip(scene.objects, layout(scene, rng, size, free)):
        cx, cy, r = cx * supersample, cy * supersample, r * supersample
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=colour)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def sample_scene(rng: random.Random, scenes_by_count: dict[int, list[Scene]], p_single: float = 0.4) -> Scene:
    pool = scenes_by_count[1] if rng.random() < p_single else scenes_by_count[2]
    return pool[rng.randrange(len(pool))]


def render_batch(scenes: list[Scene], seeds: list[int], size: int = IMAGE_SIZE, free: bool = False) -> np.ndarray:
    return np.stack([render(s, sd, size, free=free) for s, sd in zip(scenes, seeds)])
