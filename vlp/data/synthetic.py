"""Deterministic "shapes" dataset: small RGB scenes of coloured shapes with exact captions.

Each scene holds 1-6 objects in one or two groups; a group is ``count`` objects sharing a
shape, colour and size. The caption names every group with its count and attributes, e.g.
``"three red circles and a small blue square"``. Scenes depend only on ``(seed, index)``,
so any slice of the dataset can be generated independently (in parallel, in any order) and
reproduced exactly.

This module needs only numpy and Pillow (no torch, no webdataset).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Bump whenever the pixels or captions produced for a given (seed, index) change, so
# that cached shards written by an older version are regenerated.
SYNTHETIC_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds",
}
# Saturated and far apart in RGB so a tiny model separates them after noise and resizing.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 200, 0),
    "purple": (135, 40, 180),
    "orange": (255, 125, 0),
}
SIZES = ("small", "large")
# Bounding-circle radius of each size as a fraction of the image side.
SIZE_FRACTIONS = {"small": 0.09, "large": 0.15}
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

MAX_OBJECTS = 6
# Large objects crowd the canvas (at most five fit at all); capping their number keeps the
# fallback that drops unplaceable objects (and so skews the count distribution) rare.
MAX_LARGE_PER_GROUP = 3
MAX_LARGE_TOTAL = 4
# Every object stays this far (fraction of the side) from the border, so that a
# random-resized-crop keeping ~90% of the area does not cut objects off.
MARGIN_FRACTION = 0.06
# Minimum empty space between the bounding circles of two objects (fraction of the side).
GAP_FRACTION = 0.03
SIZE_WORD_PROB = 0.5
BACKGROUND_RANGE = (225, 251)
NOISE_STD = 3.0
SUPERSAMPLE = 4
LAYOUT_ATTEMPTS = 8

ZEROSHOT_TEMPLATES = (
    "two {c}",
    "three {c}",
    "four {c}",
    "five {c}",
    "two small {c}",
    "three large {c}",
)


@dataclass
class Scene:
    """One sample: an RGB image, its caption and JSON-serialisable metadata."""

    image: Image.Image
    caption: str
    meta: dict = field(default_factory=dict)


def class_names() -> list[str]:
    """All 36 colour-shape classes ("red circle", "red square", ...) in a fixed order."""
    return [f"{color} {shape}" for color, shape in itertools.product(COLORS, SHAPES)]


def zeroshot_classnames() -> list[str]:
    """Plural class phrases ("red circles", ...) aligned index-for-index with class_names()."""
    return [f"{color} {PLURALS[shape]}" for color, shape in itertools.product(COLORS, SHAPES)]


def label_index(label: str) -> int:
    """Index of ``label`` (e.g. "red circle") in class_names(); raises ValueError if unknown."""
    names = class_names()
    if label not in names:
        raise ValueError(f"unknown shapes label {label!r}; expected '<color> <shape>'")
    return names.index(label)


def object_radius(size: str, image_size: int) -> float:
    """Bounding-circle radius in pixels of an object of ``size`` ("small"/"large")."""
    return round(SIZE_FRACTIONS[size] * image_size, 2)


def _sample_groups(rng: np.random.Generator, single_group: bool) -> list[dict]:
    """Draw 1-2 groups with distinct (shape, colour) pairs and a total of 1-6 objects."""
    n_groups = 1 if single_group else int(rng.integers(1, 3))
    pairs = rng.choice(len(COLORS) * len(SHAPES), size=n_groups, replace=False)
    sizes = [SIZES[int(i)] for i in rng.integers(0, len(SIZES), size=n_groups)]
    if n_groups == 1:
        # Uniform up to the size's cap, rather than clipping, so no count is over-represented.
        cap = MAX_LARGE_PER_GROUP if sizes[0] == "large" else MAX_OBJECTS
        counts = [int(rng.integers(1, cap + 1))]
    else:
        total = int(rng.integers(2, MAX_OBJECTS + 1))
        first = int(rng.integers(1, total))
        counts = [first, total - first]
    colors, shapes = list(COLORS), SHAPES
    groups = []
    for pair, size, count in zip(pairs, sizes, counts):
        color, shape = colors[int(pair) // len(SHAPES)], shapes[int(pair) % len(SHAPES)]
        if size == "large":
            count = min(count, MAX_LARGE_PER_GROUP)
        groups.append({"shape": shape, "color": color, "size": size, "count": count})
    large = [g for g in groups if g["size"] == "large"]
    while sum(g["count"] for g in large) > MAX_LARGE_TOTAL:
        max(large, key=lambda g: g["count"])["count"] -= 1
    return groups


def drawable(groups: list[dict]) -> bool:
    """Whether :func:`make_scene` could draw ``groups`` (the caps :func:`_sample_groups` applies): no
    large group over MAX_LARGE_PER_GROUP objects and no more than MAX_LARGE_TOTAL large objects in all."""
    large = [g["count"] for g in groups if g["size"] == "large"]
    return all(n <= MAX_LARGE_PER_GROUP for n in large) and sum(large) <= MAX_LARGE_TOTAL


def _lattice(lo: float, hi: float, step: float) -> np.ndarray:
    """Points on multiples of ``step`` inside [lo, hi] (exact binary floats for step 0.5/1)."""
    start = math.ceil(lo / step) * step
    return np.arange(start, hi + 1e-9, step)


def _layout_once(rng: np.random.Generator, radii: list[float], image_size: int) -> list:
    """Greedily place bounding circles uniformly among free lattice points.

    Returns a list aligned with ``radii`` holding (x, y) or None where no free spot was left.
    """
    margin, gap = MARGIN_FRACTION * image_size, GAP_FRACTION * image_size
    step = 0.5 if image_size <= 128 else 1.0
    placed: list[tuple[float, float, float]] = []
    out: list = []
    for r in radii:
        axis = _lattice(margin + r, image_size - margin - r, step)
        xs, ys = (a.ravel() for a in np.meshgrid(axis, axis))
        free = np.ones(xs.shape, dtype=bool)
        for px, py, pr in placed:
            free &= (xs - px) ** 2 + (ys - py) ** 2 >= (r + pr + gap) ** 2
        candidates = np.flatnonzero(free)
        if candidates.size == 0:
            out.append(None)
            continue
        pick = int(candidates[rng.integers(candidates.size)])
        x, y = float(xs[pick]), float(ys[pick])
        placed.append((x, y, r))
        out.append((x, y))
    return out


def _layout(rng: np.random.Generator, radii: list[float], image_size: int) -> list:
    """Retry whole layouts (bounded) and keep the one that places the most objects."""
    best: list = []
    best_count = -1
    for _ in range(LAYOUT_ATTEMPTS):
        positions = _layout_once(rng, radii, image_size)
        count = sum(p is not None for p in positions)
        if count > best_count:
            best, best_count = positions, count
        if count == len(radii):
            break
    return best


def _place_objects(rng: np.random.Generator, groups: list[dict], image_size: int) -> list[dict]:
    """Place every object of ``groups``; drops objects that do not fit and fixes the counts.

    Large objects are placed first because they are the hardest to fit.
    """
    wanted = [(g, object_radius(g["size"], image_size)) for g in groups for _ in range(g["count"])]
    order = sorted(range(len(wanted)), key=lambda i: -wanted[i][1])
    positions = _layout(rng, [wanted[i][1] for i in order], image_size)
    located = dict(zip(order, positions))
    objects = []
    for g in groups:
        g["count"] = 0
    for i, (g, r) in enumerate(wanted):
        if located[i] is None:
            continue
        g["count"] += 1
        x, y = located[i]
        objects.append({"shape": g["shape"], "color": g["color"], "size": g["size"], "x": x, "y": y, "r": r})
    groups[:] = [g for g in groups if g["count"] > 0]
    return objects


def _shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (x, y), all within the bounding radius r."""
    if shape == "square":
        h = 0.7 * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "diamond":
        w = 0.62 * r
        return [(x, y - r), (x + w, y), (x, y + r), (x - w, y)]
    if shape == "triangle":
        angles = [-90.0, 30.0, 150.0]
        return [(x + r * math.cos(math.radians(a)), y + r * math.sin(math.radians(a))) for a in angles]
    if shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = math.radians(-90.0 + 36.0 * k)
            points.append((x + rad * math.cos(a), y + rad * math.sin(a)))
        return points
    if shape == "cross":
        a, t = 0.92 * r, 0.33 * r
        rel = [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t)]
        rel += [(t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]
        return [(x + dx, y + dy) for dx, dy in rel]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, scale: int) -> None:
    """Draw one object on a canvas that is ``scale`` times the image size."""
    x, y, r = obj["x"] * scale, obj["y"] * scale, obj["r"] * scale
    fill = COLORS[obj["color"]]
    if obj["shape"] == "circle":
        rc = 0.92 * r
        draw.ellipse([x - rc, y - rc, x + rc, y + rc], fill=fill)
    else:
        draw.polygon(_shape_polygon(obj["shape"], x, y, r), fill=fill)


def _render(rng: np.random.Generator, objects: list[dict], image_size: int) -> Image.Image:
    """Noisy near-white background plus objects, drawn supersampled then box-filtered down."""
    base = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1], size=3)
    # Grey (luminance) noise: per pixel, so exact values are useless to the model, yet the
    # PNGs stay ~40% smaller than with independent noise in each channel.
    noise = rng.normal(0.0, NOISE_STD, size=(image_size, image_size, 1))
    background = np.clip(base + noise, 0, 255).round().astype(np.uint8)
    big = image_size * SUPERSAMPLE
    canvas = Image.fromarray(background, "RGB").resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_object(draw, obj, SUPERSAMPLE)
    # Box filtering averages whole supersampled blocks, so the noise survives unchanged and
    # the shape edges come out anti-aliased.
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def group_phrase(group: dict, with_size: bool) -> str:
    """Caption fragment for one group, e.g. "an orange cross" or "two small red stars"."""
    words = [group["size"]] if with_size else []
    words.append(group["color"])
    if group["count"] == 1:
        determiner = "an" if words[0][0] in "aeiou" else "a"
        noun = group["shape"]
    else:
        determiner = NUMBER_WORDS[group["count"] - 1]
        noun = PLURALS[group["shape"]]
    return " ".join([determiner, *words, noun])


def _caption(rng: np.random.Generator, groups: list[dict]) -> tuple[str, list[dict]]:
    """Caption in a random group order; returns it with the groups in that same order."""
    order = [int(i) for i in rng.permutation(len(groups))]
    with_size = rng.random(len(groups)) < SIZE_WORD_PROB
    ordered = [groups[i] for i in order]
    phrases = [group_phrase(g, bool(with_size[k])) for k, g in enumerate(ordered)]
    return " and ".join(phrases), ordered


def _drawn_layout(seed: int, index: int, image_size: int, single_group: bool):
    """Scene ``index``'s generator, groups and placed objects, with the generator ready to render."""
    rng = np.random.default_rng([int(seed), int(index)])
    groups = _sample_groups(rng, single_group)
    objects = _place_objects(rng, groups, image_size)
    return rng, groups, objects


def render_like(seed: int, index: int, objects: list[dict], image_size: int = 64) -> Image.Image:
    """``objects`` drawn on the background (colour and noise) of scene ``index`` of ``seed``.

    With scene ``index``'s own objects this is its image; with changed ones, its counterfactual.
    (Multi-group scenes, as make_scene with single_group False.)
    """
    rng, _, _ = _drawn_layout(seed, index, image_size, False)
    return _render(rng, objects, image_size)


def make_scene(seed: int, index: int, *, image_size: int = 64, single_group: bool = False) -> Scene:
    """Generate scene ``index`` of the dataset identified by ``seed``.

    Args:
        seed: non-negative dataset seed.
        index: non-negative sample index; the RNG is ``default_rng([seed, index])`` so the
            result does not depend on which other samples were generated.
        image_size: side of the square RGB image in pixels (>= 16).
        single_group: if True the scene has exactly one group and ``meta["label"]`` is set.

    Returns:
        Scene with an ``image_size`` x ``image_size`` RGB image, a caption matching the
        drawn objects exactly, and meta with keys groups, objects, num_objects, seed,
        index (and label when single_group). Object x/y/r are in pixels.

    Raises:
        ValueError: negative seed/index or image_size < 16.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    rng, groups, objects = _drawn_layout(seed, index, image_size, single_group)
    image = _render(rng, objects, image_size)
    caption, groups = _caption(rng, groups)
    meta: dict = {
        "groups": groups,
        "objects": objects,
        "num_objects": len(objects),
        "seed": int(seed),
        "index": int(index),
    }
    if single_group:
        meta["label"] = f"{groups[0]['color']} {groups[0]['shape']}"
        meta["cls"] = label_index(meta["label"])  # the integer label zero-shot evaluation reads
    return Scene(image=image, caption=caption, meta=meta)


def iter_scenes(seed: int, start: int, count: int, **kwargs) -> Iterator[Scene]:
    """Yield scenes ``start`` .. ``start + count - 1``; kwargs go to make_scene()."""
    for index in range(start, start + count):
        yield make_scene(seed, index, **kwargs)
