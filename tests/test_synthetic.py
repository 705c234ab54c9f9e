"""Tests for the deterministic shapes dataset (vlp.data.synthetic)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlp.data import synthetic
from vlp.data.synthetic import (
    COLORS,
    MARGIN_FRACTION,
    NUMBER_WORDS,
    PLURALS,
    SHAPES,
    SIZES,
    ZEROSHOT_TEMPLATES,
    class_names,
    iter_scenes,
    label_index,
    make_scene,
    zeroshot_classnames,
)

SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def parse_phrase(phrase: str) -> dict:
    """Invert group_phrase(): "two small red stars" -> shape/color/count (+ size if stated)."""
    words = phrase.split()
    first, *rest = words
    if first in ("a", "an"):
        count = 1
        shape = rest[-1]
        assert shape in SHAPES, phrase
        # "an" exactly before vowel-initial words.
        assert (first == "an") == (rest[0][0] in "aeiou"), phrase
    else:
        count = NUMBER_WORDS.index(first) + 1
        assert count >= 2, phrase
        shape = SINGULAR[rest[-1]]
    attrs = rest[:-1]
    out = {"shape": shape, "color": attrs[-1], "count": count}
    assert attrs[-1] in COLORS, phrase
    if len(attrs) == 2:
        assert attrs[0] in SIZES, phrase
        out["size"] = attrs[0]
    else:
        assert len(attrs) == 1, phrase
    return out


def images_equal(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_index_is_identical_and_order_independent():
    first = [make_scene(3, i) for i in range(5)]
    again = [make_scene(3, i) for i in reversed(range(5))][::-1]
    for a, b in zip(first, again):
        assert images_equal(a.image, b.image)
        assert a.caption == b.caption
        assert a.meta == b.meta


def test_different_index_or_seed_differs():
    a, b, c = make_scene(0, 0), make_scene(0, 1), make_scene(1, 0)
    assert not images_equal(a.image, b.image)
    assert not images_equal(a.image, c.image)


def test_image_format_and_json_meta():
    scene = make_scene(0, 7, image_size=48)
    assert scene.image.mode == "RGB"
    assert scene.image.size == (48, 48)
    assert json.loads(json.dumps(scene.meta)) == scene.meta
    assert scene.meta["seed"] == 0 and scene.meta["index"] == 7
    assert "label" not in scene.meta


@pytest.mark.parametrize("single_group", [False, True])
def test_caption_matches_meta(single_group):
    seen_sizes_stated = set()
    for scene in iter_scenes(11, 0, 300, single_group=single_group):
        phrases = scene.caption.split(" and ")
        groups = scene.meta["groups"]
        assert len(phrases) == len(groups) in (1, 2)
        for phrase, group in zip(phrases, groups):
            parsed = parse_phrase(phrase)
            for key in ("shape", "color", "count"):
                assert parsed[key] == group[key], (scene.caption, group)
            if "size" in parsed:
                assert parsed["size"] == group["size"]
            seen_sizes_stated.add("size" in parsed)
        objects = scene.meta["objects"]
        assert scene.meta["num_objects"] == len(objects) == sum(g["count"] for g in groups)
        assert 1 <= len(objects) <= synthetic.MAX_OBJECTS
        for group in groups:
            same = [o for o in objects if (o["shape"], o["color"]) == (group["shape"], group["color"])]
            assert len(same) == group["count"]
            assert {o["size"] for o in same} == {group["size"]}
        if len(groups) == 2:
            assert (groups[0]["shape"], groups[0]["color"]) != (groups[1]["shape"], groups[1]["color"])
    # The size word is dropped sometimes and kept sometimes.
    assert seen_sizes_stated == {True, False}


def test_objects_inside_margin_and_not_overlapping():
    size = 64
    margin = MARGIN_FRACTION * size
    gap = synthetic.GAP_FRACTION * size
    for scene in iter_scenes(5, 0, 200):
        objs = scene.meta["objects"]
        for o in objs:
            assert o["x"] - o["r"] >= margin and o["x"] + o["r"] <= size - margin
            assert o["y"] - o["r"] >= margin and o["y"] + o["r"] <= size - margin
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                dist = ((a["x"] - b["x"]) ** 2 + (a["y"] - b["y"]) ** 2) ** 0.5
                assert dist >= a["r"] + b["r"] + gap - 1e-9


def test_objects_are_drawn_in_their_colour():
    scene = make_scene(2, 4)
    pixels = np.asarray(scene.image).astype(int)
    for o in scene.meta["objects"]:
        if o["shape"] in ("circle", "square", "diamond", "star", "cross"):
            centre = pixels[int(o["y"]), int(o["x"])]
            assert np.abs(centre - np.array(COLORS[o["color"]])).max() < 40, o


def test_unplaceable_objects_are_dropped_consistently():
    # Eight large objects can never fit; the counts must shrink to what was drawn.
    rng = np.random.default_rng(0)
    groups = [
        {"shape": "circle", "color": "red", "size": "large", "count": 4},
        {"shape": "star", "color": "blue", "size": "large", "count": 4},
    ]
    objects = synthetic._place_objects(rng, groups, 64)
    assert 0 < len(objects) < 8
    assert sum(g["count"] for g in groups) == len(objects)
    assert all(g["count"] > 0 for g in groups)


def test_six_small_objects_always_fit():
    rng = np.random.default_rng(1)
    for _ in range(50):
        groups = [{"shape": "cross", "color": "green", "size": "small", "count": 6}]
        assert len(synthetic._place_objects(rng, groups, 64)) == 6


def test_single_group_label():
    names = class_names()
    for scene in iter_scenes(0, 0, 100, single_group=True):
        assert len(scene.meta["groups"]) == 1
        label = scene.meta["label"]
        assert label in names
        group = scene.meta["groups"][0]
        assert label == f"{group['color']} {group['shape']}"
        assert names[label_index(label)] == label


def test_class_names_and_zeroshot_alignment():
    names, plurals = class_names(), zeroshot_classnames()
    assert len(names) == len(set(names)) == len(COLORS) * len(SHAPES) == 36
    assert names[0] == "red circle"
    for name, plural in zip(names, plurals):
        color, shape = name.split()
        assert plural == f"{color} {PLURALS[shape]}"
    assert "purple crosses" in plurals
    assert all("{c}" in t for t in ZEROSHOT_TEMPLATES)
    with pytest.raises(ValueError):
        label_index("pink circle")


def test_plurals_and_articles():
    group = {"shape": "cross", "color": "orange", "size": "small", "count": 1}
    assert synthetic.group_phrase(group, with_size=False) == "an orange cross"
    assert synthetic.group_phrase(group, with_size=True) == "a small orange cross"
    group.update(count=3, shape="diamond", color="purple", size="large")
    assert synthetic.group_phrase(group, with_size=True) == "three large purple diamonds"


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_scene(-1, 0)
    with pytest.raises(ValueError):
        make_scene(0, 0, image_size=8)


def test_no_heavy_imports():
    # The generator runs in data workers and tools that must not pay for torch/webdataset.
    root = Path(synthetic.__file__).resolve().parents[2]
    code = "import sys, vlp.data.synthetic; print(sorted({'torch', 'webdataset'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
