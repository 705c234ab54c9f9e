"""Counterfactual shapes scenes: the same scene with one attribute changed, in words and in pixels.

A scene's groups (``synthetic.make_scene``'s ``meta["groups"]``, in caption order) are phrased with
:func:`phrase`; :func:`changed_groups` changes one attribute (the compositional benchmark's negative
types) and :func:`counterfactual_scene` draws the changed groups on the same layout and background,
so the image differs from the original only where an object changed. A scene and its counterfactual
are a *minimal pair*: two true image-caption pairs one change apart (TripletCLIP's hard-negative
images, without a text-to-image model). ``vlp shards --synthetic --counterfactual-pairs`` writes
them side by side; ``loss.pair_weight`` contrasts each with its partner. :func:`counterfactual_group`
gives a scene one counterfactual of every kind at once (a minimal group, ``--every-kind``).

This module needs only numpy and Pillow, like :mod:`vlp.data.synthetic`.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np

from vlp.data import synthetic

# the compositional benchmark's negative types, and what each changes
CHANGE_TYPES = ("swap_attribute", "replace_attribute", "replace_object")


def phrase(groups: list[dict], flags: tuple[bool, ...]) -> str:
    """Caption of ``groups`` in order, with the size word where ``flags`` says (as make_scene)."""
    return " and ".join(synthetic.group_phrase(g, f) for g, f in zip(groups, flags))


def size_flags(groups: list[dict], caption: str) -> tuple[bool, ...]:
    """Which groups of ``caption`` (in caption order) carry their size word.

    Raises:
        ValueError: no choice of size words reproduces ``caption`` from ``groups``.
    """
    for flags in itertools.product((False, True), repeat=len(groups)):
        if phrase(groups, flags) == caption:
            return flags
    raise ValueError(f"caption {caption!r} does not match its groups {groups}")


def describes(groups: list[dict], flags: tuple[bool, ...], image_groups: list[dict]) -> bool:
    """Whether the caption of ``groups``/``flags`` is true of an image holding ``image_groups``.

    True when the groups pair up one-to-one with equal shape, colour and count, and equal size
    where the caption names it (a caption without size words fits either size).
    """
    if len(groups) != len(image_groups):
        return False

    def same(g: dict, with_size: bool, h: dict) -> bool:
        return all(g[k] == h[k] for k in ("shape", "color", "count")) and (not with_size or g["size"] == h["size"])

    return any(
        all(same(g, f, h) for g, f, h in zip(groups, flags, perm)) for perm in itertools.permutations(image_groups)
    )


def check_kinds(kinds) -> None:
    """Raise ValueError unless ``kinds`` is a non-empty subset of :data:`CHANGE_TYPES`."""
    unknown = [k for k in kinds if k not in CHANGE_TYPES]
    if unknown or not kinds:
        raise ValueError(
            f"counterfactual kinds must be a non-empty subset of {list(CHANGE_TYPES)}; unknown kinds {unknown} "
            f"in {list(kinds)}"
        )


def changed_groups(groups: list[dict], kind: str, rng: np.random.Generator) -> list[dict] | None:
    """A copy of ``groups`` with one change, or None where ``kind`` does not apply.

    swap_attribute swaps the colours of two groups (None unless there are exactly two);
    replace_attribute gives one group (drawn from ``rng``) a colour absent from the scene;
    replace_object gives one group a shape absent from the scene. The result may still describe
    the image (a swap of equal colours): check with :func:`describes`.
    """
    if kind == "swap_attribute":
        if len(groups) != 2:
            return None
        a, b = groups
        return [{**a, "color": b["color"]}, {**b, "color": a["color"]}]
    keys = {"replace_attribute": ("color", synthetic.COLORS), "replace_object": ("shape", synthetic.SHAPES)}
    if kind not in keys:
        raise ValueError(f"unknown change {kind!r}; expected one of {CHANGE_TYPES}")
    key, values = keys[kind]
    choices = [v for v in values if v not in {g[key] for g in groups}]
    new = [dict(g) for g in groups]
    new[int(rng.integers(len(groups)))][key] = choices[int(rng.integers(len(choices)))]
    return new


def counterfactual_scene(
    seed: int, index: int, kinds: tuple[str, ...], *, image_size: int = 64
) -> tuple[synthetic.Scene, synthetic.Scene | None]:
    """Scene ``index`` (exactly ``make_scene(seed, index)``) and its counterfactual, or None.

    The counterfactual applies one of ``kinds`` (:data:`CHANGE_TYPES`), drawn uniformly among
    those that apply and make a caption false of the original; None when none does. Its image
    has the same background noise and object positions; its caption has the original's group
    order and size words. Its meta has ``groups`` and ``objects`` of the new scene, ``index``
    and ``seed`` of the original and ``counterfactual``: the kind.
    """
    scene, flags, options, rng = _changes(seed, index, kinds, image_size)
    if not options:
        return scene, None
    kind, new = options[int(rng.integers(len(options)))]
    return scene, _draw_change(scene, flags, kind, new, image_size)


def counterfactual_group(
    seed: int, index: int, kinds: tuple[str, ...], *, image_size: int = 64
) -> tuple[synthetic.Scene, list[synthetic.Scene]]:
    """Scene ``index`` and one counterfactual of every kind in ``kinds``, in that order (a minimal
    group: each member one change from the original), or an empty list unless every kind applies,
    makes a caption false of the original and differs from the other members' captions. The
    changes are the ones :func:`counterfactual_scene` draws from (the same random stream)."""
    scene, flags, options, _ = _changes(seed, index, kinds, image_size)
    if len(options) < len(kinds) or len({phrase(new, flags) for _, new in options}) < len(options):
        return scene, []
    return scene, [_draw_change(scene, flags, kind, new, image_size) for kind, new in options]


def _changes(seed: int, index: int, kinds: tuple[str, ...], image_size: int):
    """The scene, its size flags, the (kind, changed groups) of each kind that applies and makes
    the caption false, and the random stream drawn from so far."""
    check_kinds(kinds)
    scene = synthetic.make_scene(seed, index, image_size=image_size)
    groups = scene.meta["groups"]
    flags = size_flags(groups, scene.caption)
    rng = np.random.default_rng([int(seed), int(index), 7])  # apart from make_scene's and the benchmark's
    options = [(kind, changed_groups(groups, kind, rng)) for kind in kinds]
    options = [(k, new) for k, new in options if new is not None and not describes(new, flags, groups)]
    return scene, flags, options, rng


def _draw_change(scene: synthetic.Scene, flags, kind: str, new: list[dict], image_size: int) -> synthetic.Scene:
    """The counterfactual scene: ``new`` groups drawn on ``scene``'s layout and background."""
    groups, seed, index = scene.meta["groups"], scene.meta["seed"], scene.meta["index"]
    swap = {(g["shape"], g["color"]): (n["shape"], n["color"]) for g, n in zip(groups, new)}
    objects = []
    for obj in scene.meta["objects"]:
        shape, color = swap[(obj["shape"], obj["color"])]
        objects.append({**obj, "shape": shape, "color": color})
    image = synthetic.render_like(seed, index, objects, image_size)
    meta = {**copy.deepcopy(scene.meta), "groups": new, "objects": objects, "counterfactual": kind}
    return synthetic.Scene(image=image, caption=phrase(new, flags), meta=meta)
