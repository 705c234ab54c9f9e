"""Tests for counting counterfactuals (vlp.data.counting)."""

import random

import pytest

from vlp.data.counting import (
    NUMBER_WORDS,
    count_of,
    counterfactual,
    counterfactuals,
    find_counts,
    is_counting_sample,
    mix_indices,
    split_counting,
)
from vlp.data.synthetic import make_scene


def _spans(caption, *phrases):
    """(start, end, value) for each (text, value) pair, located left to right in ``caption``."""
    out, pos = [], 0
    for text, value in phrases:
        start = caption.index(text, pos)
        out.append((start, start + len(text), value))
        pos = start + len(text)
    return out


# (caption, [(count text, value), ...]) in caption order.
FIND_CASES = [
    ("two dogs playing", [("two", 2)]),
    ("Three cats and 2 birds", [("Three", 3), ("2", 2)]),
    ("TEN apples", [("TEN", 10)]),
    ("Seven Dwarfs at a table", [("Seven", 7)]),
    ("a man holding 3 red balloons", [("3", 3)]),
    ("10 kids on a bus", [("10", 10)]),
    ("a pair of shoes", [("a pair of", 2)]),
    ("A  pair of boots by the door", [("A  pair of", 2)]),
    ("one dog and two cats", [("one", 1), ("two", 2)]),
    ("1 dog", [("1", 1)]),
    ("One man riding a horse", [("One", 1)]),
    ("twelve eggs in a carton", [("twelve", 12)]),
    ("a dozen eggs", [("a dozen", 12)]),
    ("two dozen roses", [("two dozen", 24)]),
    ('"two" dogs', []),
    ("(two dogs) sleeping", [("two", 2)]),
    ("two sleeping cats", [("two", 2)]),
    ("three large red triangles and a green cross", [("three", 3)]),
    ("15 people at a party", [("15", 15)]),
    ("a couple of people", []),
    ("a couple sitting on a bench", []),
    ("at 2 pm", []),
    ("2am party", []),
    ("10:30 meeting", []),
    ("dinner at 5 o'clock sharp", []),
    ("a party at 5 in the park", []),
    ("born in 2019", []),
    ("May 5 parade", []),
    ("the parade on 5 May", []),
    ("5th of May", []),
    ("on the 10th of June", []),
    ("the second car", []),
    ("the first and third runners", []),
    ("the 2nd and 3rd floors", []),
    ("one of the dogs", []),
    ("two of the dogs are black", []),
    ("the red one", []),
    ("the red one is big", []),
    ("this one has a hat", []),
    ("the little one sleeping", []),
    ("the dogs love one another", []),
    ("no one is here", []),
    ("someone waving", []),
    ("anyone home", []),
    ("everyone smiles", []),
    ("often ten", []),
    ("5 km run", []),
    ("a 10 kg bag", []),
    ("3 years old", []),
    ("a 3 year-old boy", []),
    ("2 inches of snow", []),
    ("5 minutes left", []),
    ("10 percent off", []),
    ("$5 bill", []),
    ("5% discount", []),
    ("a 3-2 win", []),
    ("2/3 of a pie", []),
    ("two thirds of a pie", []),
    ("2.5 liters of water", []),
    ("1,000 people", []),
    ("iphone 10 box", []),
    ("windows 10 laptop", []),
    ("route 66 sign", []),
    ("number 7 jersey", []),
    ("no. 5 jersey", []),
    ("#5 player", []),
    ("apollo 11 rocket", []),
    ("four-legged animal", []),
    ("a two-story house", []),
    ("a 3-year-old child", []),
    ("a 2 x 4 board", []),
    ("I counted two.", []),
    ("07 buses", []),
    ("3D glasses", []),
    ("one's own dog", []),
]


@pytest.mark.parametrize(("caption", "expected"), FIND_CASES)
def test_find_counts_table(caption, expected):
    assert find_counts(caption) == _spans(caption, *expected)


def test_find_counts_table_is_large():
    assert len(FIND_CASES) >= 30
    assert sum(1 for _, expected in FIND_CASES if not expected) >= 20


@pytest.mark.parametrize(
    ("caption", "value"),
    [
        ("two dogs playing", 2),
        ("a pair of shoes", 2),
        ("TEN apples", 10),
        ("a man with 4 bags", 4),
        ("one dog", None),
        ("twelve eggs", None),
        ("Three cats and 2 birds", None),
        ("a dog on grass", None),
        ("born in 2019", None),
    ],
)
def test_count_of(caption, value):
    assert count_of(caption) == value
    assert is_counting_sample(caption) == (value is not None)


@pytest.mark.parametrize(
    "caption",
    ["a dog on grass", "one dog", "1 dog", "Three cats and 2 birds", "twelve eggs", "a dozen eggs", "11 players"],
)
def test_counterfactual_none(caption):
    assert counterfactual(caption, random.Random(0)) is None
    assert counterfactuals(caption, random.Random(0), 5) == []


def _new_count(original, changed):
    """The count text that replaced the original's single count (text around it unchanged)."""
    ((start, end, _),) = find_counts(original)
    prefix, suffix = original[:start], original[end:]
    assert changed.startswith(prefix) and changed.endswith(suffix)
    return changed[len(prefix) : len(changed) - len(suffix)]


@pytest.mark.parametrize(
    ("caption", "value", "style"),
    [
        ("two dogs playing in the park", 2, str.islower),
        ("Three cats on a sofa", 3, lambda w: w == w.capitalize()),
        ("SEVEN SWANS A-SWIMMING", 7, str.isupper),
        ("a man with 4 bags", 4, str.isdigit),
        ("10 kids on a bus", 10, str.isdigit),
        ("a pair of shoes", 2, str.islower),
        ("A pair of shoes", 2, lambda w: w == w.capitalize()),
    ],
)
def test_counterfactual_changes_only_the_count(caption, value, style):
    seen = set()
    for seed in range(200):
        changed = counterfactual(caption, random.Random(seed))
        new = _new_count(caption, changed)
        assert style(new), (caption, changed)
        new_value = int(new) if new.isdigit() else NUMBER_WORDS[new.lower()]
        assert new_value in range(2, 11) and new_value != value
        assert count_of(changed) == new_value
        seen.add(new_value)
    assert seen == set(range(2, 11)) - {value}


def test_pair_of_becomes_number_word():
    changed = counterfactual("a pair of shoes", random.Random(3))
    word, rest = changed.split(" ", 1)
    assert rest == "shoes" and NUMBER_WORDS[word] != 2


def test_counterfactual_reproducible():
    caption = "five horses in a field"
    assert counterfactual(caption, random.Random(42)) == counterfactual(caption, random.Random(42))
    draws = {counterfactual(caption, random.Random(s)) for s in range(20)}
    assert len(draws) > 1


def test_counterfactual_takes_a_numpy_generator_or_an_int_seed():
    import numpy as np

    caption = "five horses in a field"
    assert counterfactual(caption, 7) == counterfactual(caption, random.Random(7))
    a, b = (counterfactual(caption, np.random.default_rng(3)) for _ in range(2))
    assert a == b and a != caption and a.endswith(" horses in a field")
    everything = counterfactuals(caption, np.random.default_rng(0), 100)
    assert len(everything) == len(set(everything)) == 8
    with pytest.raises(TypeError, match="random.Random, a numpy.random.Generator or an int seed"):
        counterfactual(caption, None)


def test_counterfactuals_distinct():
    out = counterfactuals("two dogs", random.Random(0), 5)
    assert len(out) == len(set(out)) == 5 and "two dogs" not in out
    everything = counterfactuals("two dogs", random.Random(0), 100)
    assert sorted(everything) == sorted(f"{w} dogs" for w, v in NUMBER_WORDS.items() if 3 <= v <= 10)


def test_split_counting():
    captions = ["two dogs", "a cat", "one dog", "Three cats and 2 birds", "a pair of socks", "4 cars"]
    assert split_counting(captions) == ([0, 4, 5], [1, 2, 3])


@pytest.mark.parametrize(("ratio", "n"), [(0.0, 50), (0.25, 40), (0.3, 7), (0.5, 101), (1.0, 9)])
def test_mix_indices_ratio(ratio, n):
    counting, ordinary = [0, 3, 5], [1, 2, 4, 6, 7, 8]
    mixed = mix_indices(counting, ordinary, ratio, n, random.Random(0))
    assert len(mixed) == n
    n_counting = sum(i in counting for i in mixed)
    assert abs(n_counting - ratio * n) <= 0.5
    assert set(mixed) <= set(counting) | set(ordinary)


def test_mix_indices_deterministic_and_covering():
    counting, ordinary = list(range(0, 10)), list(range(10, 40))
    a = mix_indices(counting, ordinary, 0.25, 40, random.Random(7))
    assert a == mix_indices(counting, ordinary, 0.25, 40, random.Random(7))
    assert a != mix_indices(counting, ordinary, 0.25, 40, random.Random(8))
    # each subset is drawn in passes: the 10 counting and 30 ordinary indices each appear once
    assert sorted(a) == list(range(40))


def test_mix_indices_errors():
    with pytest.raises(ValueError):
        mix_indices([0], [1], 1.5, 10, random.Random(0))
    with pytest.raises(ValueError):
        mix_indices([0], [1], 0.5, -1, random.Random(0))
    with pytest.raises(ValueError):
        mix_indices([], [1], 0.5, 10, random.Random(0))
    assert sorted(mix_indices([], [1, 2], 0.0, 4, random.Random(0))) == [1, 1, 2, 2]


def test_shapes_captions():
    single = 0
    for index in range(200):
        scene = make_scene(0, index)
        caption, groups = scene.caption, scene.meta["groups"]
        expected = [g["count"] for g in groups if g["count"] >= 2]
        counts = find_counts(caption)
        assert [v for _, _, v in counts] == expected, caption
        assert all(caption[s:e] in NUMBER_WORDS for s, e, _ in counts)
        if len(expected) != 1:
            assert counterfactual(caption, random.Random(index)) is None
            continue
        single += 1
        changed = counterfactual(caption, random.Random(index)).split()
        words = caption.split()
        diff = [i for i, (a, b) in enumerate(zip(words, changed)) if a != b]
        assert len(changed) == len(words) and len(diff) == 1, (caption, changed)
        assert words[diff[0]] in NUMBER_WORDS and changed[diff[0]] in NUMBER_WORDS
    assert single >= 50
