"""The rule-based negatives on real-caption text (issue #30): multi-word nouns, size and material
adjectives, names; and tools/negatives_coverage.py, which measures coverage per type."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from vlp.data import lexicon as lx
from vlp.data.negatives import TYPES, generate, parse

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "tests" / "data" / "negatives_captions.txt"


def _texts(caption: str, kind: str, seeds: int = 6, k: int = 6) -> list[str]:
    return sorted({t for s in range(seeds) for t, _ in generate(caption, [kind], k, seed=s)})


def _tool():
    spec = importlib.util.spec_from_file_location("negatives_coverage", ROOT / "tools" / "negatives_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _orphans(text: str, compound: str) -> list[str]:
    """Words of ``compound`` in ``text`` that no multi-word noun holds ("tennis" in "tennis kite")."""
    cap = parse(text)
    held = {j for s in cap.of("noun") if " " in s.lemma for j in range(s.start, s.end)}
    return [w for j, w in enumerate(cap.low) if w in compound.split() and j not in held]


def test_multi_word_nouns_are_replaced_and_moved_whole():
    # no word of a compound stays behind with another head ("tennis kite", "living tower", "salad cream cone")
    for caption, compound in [
        ("A boy swinging a tennis racket at a ball.", "tennis racket"),
        ("A cat sleeping in a living room.", "living room"),
        ("An ice cream cone in a child's hand.", "ice cream cone"),
        ("A dog sitting next to a fire hydrant.", "fire hydrant"),
        ("A red double decker bus on a street.", "double decker bus"),
    ]:
        texts = _texts(caption, "replace_object") + _texts(caption, "swap_objects")
        assert any(compound not in t for t in texts), caption  # the compound itself is replaced
        for text in texts:
            assert not _orphans(text, compound), (caption, text)
    # swaps move the whole compound, and a pizza "on a cutting board" has no verb "cutting" to replace
    assert ("a baseball bat holding a man", "swap_objects") in generate(
        "a man holding a baseball bat", ["swap_objects"], 4, seed=0
    )
    for text in _texts("A pizza on a wooden cutting board.", "replace_relation"):
        assert text.endswith(" a wooden cutting board."), text
    assert [(s.kind, s.lemma) for s in parse("a tennis player holding a tennis racket").slots] == [
        ("noun", "tennis player"),
        ("rel", "holding"),
        ("noun", "tennis racket"),
    ]


def test_size_and_material_adjectives_are_replaced_and_swapped():
    caption = "a massive iron gate next to a tiny wood door"
    changed = set()
    for text in _texts(caption, "replace_attribute"):
        (old, new), *rest = [(a, b) for a, b in zip(caption.split(), text.split()) if a != b]
        assert not rest and lx.ADJECTIVE_CATEGORY[old] == lx.ADJECTIVE_CATEGORY[new], text
        changed.add(lx.ADJECTIVE_CATEGORY[old])
    assert changed == {"size", "material"}
    assert _texts(caption, "swap_attributes") == [
        "a massive wood gate next to a tiny iron door",
        "a tiny iron gate next to a massive wood door",
    ]
    for text in _texts("a porcelain vase next to a metal bucket", "replace_attribute"):
        new = text.split()[1] if text.endswith(" metal bucket") else text.split()[-2]
        assert lx.ADJECTIVE_CATEGORY[new] == "material" and new not in ("ceramic", "porcelain", "metal"), text
    assert [(s.kind, s.lemma) for s in parse("a straw hat and a tiny teapot").slots] == [
        ("adj", "straw"),
        ("noun", "hat"),
        ("adj", "tiny"),
        ("noun", "teapot"),
    ]
    # the ground of a scene is an attribute too
    assert "a dog running on a grassy beach" in _texts("a dog running on a sandy beach", "replace_attribute")
    # a swap that only exchanges two noun phrases says the same: none
    assert generate("a big dog and a small dog in a yard", ["swap_attributes"], 4, seed=0) == []
    assert generate("a big dog and a small cat in a yard", ["swap_attributes"], 4, seed=0) == [
        ("a small dog and a big cat in a yard", "swap_attributes")
    ]


def test_old_is_the_opposite_of_young_for_people_and_of_new_for_things():
    assert _texts("an old truck parked on a street", "replace_attribute") == ["a new truck parked on a street"]
    assert _texts("an old man sitting on a bench", "replace_attribute") == ["a young man sitting on a bench"]
    assert _texts("the truck is old", "replace_attribute") == ["the truck is new"]


def test_shades_and_fixed_phrases_are_not_attributes():
    for text in _texts("a man in a light blue shirt", "replace_attribute"):
        assert text.startswith("a man in a light ") and not text.endswith(" blue shirt"), text
    assert generate("a little league baseball player pitching", ["replace_attribute"], 4, seed=0) == []
    assert generate("a view of big ben from across the river", ["replace_attribute"], 4, seed=0) == []


def test_names_are_not_replaced_by_common_words():
    assert generate("A view of Big Ben from across the river.", ["replace_attribute"], 4, seed=0) == []
    assert generate("A man wearing a Boston Red Sox cap.", ["replace_attribute"], 4, seed=0) == []
    for kind in ("replace_object", "swap_objects", "shuffle_nouns_adjectives"):
        for text in _texts("The Eiffel Tower behind some trees near the river.", kind):
            assert "Eiffel Tower" in text, text
        for text in _texts("A woman holding an Apple laptop on a train.", kind):
            assert "an Apple " in text, text
    # a name that opens a lexicon phrase is part of that noun; a word put in its place is not a name
    texts = _texts("A Christmas tree in the corner of a living room.", "replace_object")
    assert any(not t.startswith("A Christmas tree") for t in texts)
    for text in texts:
        assert text.startswith("A Christmas tree ") or ("Christmas" not in text and text.split()[1].islower()), text
    # title case says nothing about names: every word is still a candidate
    assert generate("A Dog On A Red Sofa", ["replace_attribute"], 1, seed=0)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_coverage_tool_table_and_json(tmp_path, capsys):
    tool = _tool()
    lines = "# a comment\nA red car next to a small house.\n\nhello there world\nA cat on a wooden table.\n"
    captions = _write(tmp_path / "captions.txt", lines)
    out = tmp_path / "out" / "coverage.json"
    result = tool.main([str(captions), "--out", str(out), "--examples", "1"])
    table = capsys.readouterr().out
    assert result == json.loads(out.read_text(encoding="utf-8"))
    assert result["num_captions"] == 3 and set(result["types"]) == {*TYPES, "any_replace_or_swap"}
    swap = result["types"]["swap_attributes"]
    assert (swap["covered"], swap["total"], swap["examples"]) == (0, 3, [])
    assert set(swap["uncovered"]) == {
        "A red car next to a small house.",
        "hello there world",
        "A cat on a wooden table.",
    }
    attr = result["types"]["replace_attribute"]
    assert (attr["covered"], attr["uncovered"]) == (2, ["hello there world"])
    ((caption, negative),) = attr["examples"]
    assert caption in ("A red car next to a small house.", "A cat on a wooden table.") and negative != caption
    assert result["types"]["any_replace_or_swap"]["covered"] == 2
    assert "| `replace_attribute` | 2 / 3 | 66.7% |" in table and "| `swap_attributes` | 0 / 3 | 0.0% |  |" in table

    # COCO caption annotations, --types, --limit and --json
    coco = {"images": [], "annotations": [{"image_id": 1, "id": 1, "caption": "A dog on a bench. "}] * 3}
    path = _write(tmp_path / "captions_val.json", json.dumps(coco))
    result = tool.main([str(path), "--types", "replace_relation", "--limit", "2", "--json"])
    assert json.loads(capsys.readouterr().out) == result
    assert result["num_captions"] == 2 and list(result["types"]) == ["replace_relation", "any_replace_or_swap"]
    assert result["types"]["replace_relation"]["covered"] == 2


def test_coverage_tool_reads_the_shipped_captions():
    captions = _tool().read_captions(CAPTIONS)
    raw = [line for line in CAPTIONS.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    assert captions == raw and len(captions) >= 200
