"""Hard-negative captions: the rule types, the language-model pipeline, and `vlp negatives`."""

from __future__ import annotations

import json
import tarfile

import pytest

from tests.conftest import png_bytes, run_main, write_tar
from vlp.data import lexicon as lx
from vlp.data.negatives import SHUFFLE_TYPES, TYPES, generate, normalize, parse
from vlp.data.negatives_shards import sample_seed
from vlp.data.synthetic import SHAPES, make_scene


def _diff(a: str, b: str) -> list[tuple[str, str]]:
    """(old, new) word pairs where two captions of the same length in words differ, leaving
    out "a" <-> "an"."""
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb) if x != y and {x.lower(), y.lower()} != {"a", "an"}]


def _articles_agree(text: str) -> bool:
    words = text.split()
    return all(lx.article_for(nxt) == w.lower() for w, nxt in zip(words, words[1:]) if w.lower() in ("a", "an"))


def test_replace_attribute_changes_one_adjective_within_its_category():
    caption = "a red car next to a small house"
    negatives = generate(caption, ["replace_attribute"], 10, seed=0)
    assert len(negatives) >= 5
    for text, kind in negatives:
        assert kind == "replace_attribute"
        ((old, new),) = _diff(caption, text)
        assert lx.ADJECTIVE_CATEGORY[old] == lx.ADJECTIVE_CATEGORY[new] and old != new
    assert {lx.ADJECTIVE_CATEGORY[_diff(caption, t)[0][0]] for t, _ in negatives} == {"color", "size"}
    assert "a red car next to a large house" in [t for t, _ in negatives]


def test_replace_relation_prefers_the_opposite():
    caption = "a cat on a table"
    negatives = generate(caption, ["replace_relation"], 8, seed=0)
    texts = [t for t, _ in negatives]
    assert "a cat under a table" in texts
    for text in texts:
        assert text.startswith("a cat ") and text.endswith(" a table")
        relation = text[len("a cat ") : -len(" a table")]
        assert relation in lx.RELATION_KIND and lx.RELATION_KIND[relation] != lx.RELATION_KIND["on"]
    firsts = [generate("a man in front of a bus", ["replace_relation"], 1, seed=s)[0][0] for s in range(20)]
    assert firsts.count("a man behind a bus") >= 10  # the opposite comes first most of the time


def test_replace_object_keeps_number_and_fixes_articles():
    caption = "two dogs and an apple"
    negatives = generate(caption, ["replace_object"], 12, seed=1)
    assert len(negatives) >= 6
    for text, _ in negatives:
        assert _articles_agree(text), text
        nouns = parse(text).of("noun")
        assert [n.number for n in nouns] == ["pl", "sg"], text
        assert sum(n.lemma != old for n, old in zip(nouns, ("dog", "apple"))) == 1, text
    assert any(" and a " in t for t, _ in negatives)  # "an apple" -> "a <consonant>"
    # invariant plurals take their number from the determiner
    for text, _ in generate("three sheep on a hill", ["replace_object"], 10, seed=0):
        assert parse(text).of("noun")[0].number == "pl"
        assert text.startswith("three sheep") or lx.plural(parse(text).of("noun")[0].lemma) in text


def test_swaps():
    assert generate("a red cube and a blue ball", ["swap_attributes"], 4, seed=0) == [
        ("a blue cube and a red ball", "swap_attributes")
    ]
    assert generate("a dog on two chairs", ["swap_objects"], 4, seed=0) == [("a chair on two dogs", "swap_objects")]
    assert generate("an apple next to a car", ["swap_objects"], 4, seed=0) == [
        ("a car next to an apple", "swap_objects")
    ]
    # two adjectives of one noun, or of different categories, do not swap
    assert generate("a red and blue car", ["swap_attributes"], 4, seed=0) == []
    assert generate("a red car and a small ball", ["swap_attributes"], 4, seed=0) == []
    assert generate("the car is red and the house is blue", ["swap_attributes"], 4, seed=0) == [
        ("the car is blue and the house is red", "swap_attributes")
    ]


def test_ambiguous_words_and_casing():
    assert [s.kind for s in parse("an orange on a plate").slots] == ["noun", "rel", "noun"]
    assert [s.kind for s in parse("an orange cat").slots] == ["adj", "noun"]
    assert [s.kind for s in parse("a red square").slots] == ["adj", "noun"]
    text = generate("An orange cat, asleep.", ["replace_attribute"], 1, seed=0)[0][0]
    assert text.endswith(" cat, asleep.") and text[0] == "A" and _articles_agree(text)
    for text, _ in generate("A Dog On A Red Sofa!", ["replace_object", "replace_attribute"], 6, seed=0):
        assert all(w[0].isupper() for w in text.split()) and text.endswith("!")


@pytest.mark.parametrize("kind", SHUFFLE_TYPES)
def test_aro_shuffles_permute_the_words(kind):
    caption = "a small brown dog sits on a large red carpet near the door"
    negatives = generate(caption, [kind], 5, seed=0)
    assert negatives
    for text, got in negatives:
        assert got == kind and text != caption and sorted(text.split()) == sorted(caption.split())
    if kind == "shuffle_nouns_adjectives":
        for text, _ in negatives:  # only nouns and adjectives move
            for old, new in _diff(caption, text):
                assert (old in lx.ADJECTIVE_CATEGORY) == (new in lx.ADJECTIVE_CATEGORY)
                assert old in lx.ADJECTIVE_CATEGORY or (old,) in lx.noun_forms() or old == "carpet"


def test_validation_and_determinism():
    caption = "A man holding a red umbrella next to a dog"
    positives = ["a man holding a blue umbrella next to a dog", "A MAN   holding a red umbrella next to a cat"]
    negatives = generate(caption, TYPES, 30, seed=5, positives=positives)
    norms = [normalize(t) for t, _ in negatives]
    assert len(negatives) == 30 and len(set(norms)) == 30
    assert not {normalize(caption), *map(normalize, positives)} & set(norms)
    assert {kind for _, kind in negatives} == set(TYPES) - {"swap_attributes"}  # one adjective: no swap
    assert generate(caption, TYPES, 30, seed=5, positives=positives) == negatives
    assert generate(caption, TYPES, 30, seed=6, positives=positives) != negatives
    assert len(generate(caption, TYPES, 3, seed=5)) == 3


def test_types_that_do_not_apply_give_nothing():
    assert generate("a red square", ["replace_relation", "swap_objects", "swap_attributes"], 4, seed=0) == []
    assert generate("", TYPES, 4, seed=0) == []
    assert generate("hello there world", [t for t in TYPES if t not in SHUFFLE_TYPES], 4, seed=0) == []
    assert generate("a red car", ["replace_attribute"], 0, seed=0) == []
    with pytest.raises(ValueError, match="replace_object"):
        generate("a red car", ["replace_colour"], 2, seed=0)


def test_shapes_captions():
    shapes = set(SHAPES) | {lx.plural(s) for s in SHAPES}
    swapped = 0
    for i in range(30):
        scene = make_scene(0, i)
        caption = scene.caption
        by_type = {}
        for text, kind in generate(caption, ["replace_attribute", "replace_object", "swap_attributes"], 6, seed=i):
            by_type.setdefault(kind, []).append(text)
            assert _articles_agree(text), text
            changes = _diff(caption, text)
            if kind == "swap_attributes":
                assert len(changes) == 2 and changes[0] == changes[1][::-1], (caption, text)
                continue
            ((old, new),) = changes
            if kind == "replace_attribute":
                assert lx.ADJECTIVE_CATEGORY[old] == lx.ADJECTIVE_CATEGORY[new], (caption, text)
            else:  # another shape, in the same number
                assert new in shapes and (new in SHAPES) == (old in SHAPES), (caption, text)
        assert by_type.get("replace_attribute") and by_type.get("replace_object"), caption
        colors = {g["color"] for g in scene.meta["groups"]}
        swapped += bool(by_type.get("swap_attributes"))
        assert bool(by_type.get("swap_attributes")) == (len(colors) > 1 or _sizes_differ(caption)), caption
    assert swapped > 0


def _sizes_differ(caption: str) -> bool:
    sizes = [w for w in caption.split() if lx.ADJECTIVE_CATEGORY.get(w) == "size"]
    return len(set(sizes)) > 1


def test_sample_seed_is_stable():
    assert sample_seed(0, "data-000000.tar", "000000001") == sample_seed(0, "data-000000.tar", "000000001")
    assert sample_seed(0, "data-000000.tar", "000000001") == 3241551091626637146
    assert sample_seed(1, "data-000000.tar", "000000001") != sample_seed(0, "data-000000.tar", "000000001")


# --- language model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 and a byte-level BPE tokenizer trained on a few lines."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from vlp.data.negatives_lm import PROMPTS, build_prompt

    folder = tmp_path_factory.mktemp("tiny_lm")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([build_prompt(kind, "a red car on a road") for kind in PROMPTS], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tokenizer), n_positions=512)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_lm_generator_pipeline(tiny_lm):
    from vlp.data.negatives_lm import LMNegativeGenerator

    types = ["replace_object", "replace_attribute"]
    gen = LMNegativeGenerator(tiny_lm, types, max_new_tokens=8, batch_size=3, seed=0)
    captions = ["a red car on a road", "a cat on a table", ""]
    out = gen.generate(captions, 2, positives=[["a blue car on a road"], [], []])
    assert len(out) == 3 and out[2] == []
    for caption, negatives in zip(captions, out):
        assert len(negatives) <= 2
        for text, kind in negatives:
            assert isinstance(text, str) and text and "\n" not in text and kind in types
            assert normalize(text) != normalize(caption)
    assert sum(map(len, out)) > 0
    assert gen.generate(captions, 2, positives=[["a blue car on a road"], [], []]) == out  # seeded

    # the filter applies: echoes of the caption or of a positive and repeats are dropped
    gen._complete = lambda prompts, seed: ["A red car on a road", "a blue car  on a road", "x", "x"][: len(prompts)]
    assert gen.generate(["a red car on a road"], 4, positives=[["a blue car on a road"]]) == [[("x", "replace_object")]]


def test_lm_generator_errors(tiny_lm, tmp_path):
    from vlp.data.negatives_lm import LMNegativeGenerator

    with pytest.raises(ValueError, match="rules"):
        LMNegativeGenerator(tiny_lm, ["shuffle_all_words"])
    with pytest.raises(FileNotFoundError):
        LMNegativeGenerator(tmp_path / "missing", ["replace_object"])


def test_lm_generator_writes_shards(tiny_lm, tmp_path):
    from vlp.data.negatives_shards import write_negative_shards

    (tmp_path / "in").mkdir()
    shard = write_tar(tmp_path / "in" / "d-000000.tar", _samples(4))
    summary = write_negative_shards(
        str(shard),
        tmp_path / "out",
        types=["replace_relation"],
        k=2,
        generator="lm",
        lm_model=tiny_lm,
        lm_batch_size=4,
        progress=False,
    )
    assert summary["num_samples"] == 4 and set(summary["types"]) <= {"replace_relation"}
    members = _members(tmp_path / "out" / "d-000000.tar")
    assert len(members) == 12
    for name, data in members.items():
        if name.endswith(".json"):
            negatives = json.loads(data)["hard_negatives"]
            assert len(negatives) <= 2 and all(n["type"] == "replace_relation" for n in negatives)


# --- vlp negatives ------------------------------------------------------------------------


def _samples(n: int, start: int = 0) -> list[dict]:
    captions = ["a red car next to a small house", "a cat on a table", "two dogs and a blue ball", "a tree"]
    return [
        {
            "__key__": f"{i:09d}",
            "png": png_bytes(color=(i * 10 % 256, 0, 0)),
            "txt": captions[i % len(captions)].encode(),
            "json": json.dumps({"index": i}).encode(),
        }
        for i in range(start, start + n)
    ]


def _members(path) -> dict[str, bytes]:
    """{member name: bytes} of a tar, reading as far as it goes."""
    out = {}
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                out[info.name] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError):
        pass
    return out


def _input_shards(folder) -> dict:
    folder.mkdir()
    good = _samples(6)
    good[0]["json"] = json.dumps(
        {"index": 0, "caption_variants": ["a red car next to a small house", "a red car next to a large house"]}
    ).encode()
    write_tar(folder / "d-000000.tar", good)
    no_json = {k: v for k, v in _samples(1, 10)[0].items() if k != "json"}
    bad = [
        no_json,
        {**_samples(1, 11)[0], "txt": b"\xff\xfe not utf-8"},
        {**_samples(1, 12)[0], "json": b"[1, 2, 3]"},
        {"__key__": "000000013", "png": png_bytes()},  # no caption
        _samples(1, 14)[0],
    ]
    write_tar(folder / "d-000001.tar", bad)
    full = write_tar(folder / "full.tar", _samples(8, 20))
    data = full.read_bytes()
    (folder / "d-000002.tar").write_bytes(data[: len(data) // 2 + 100])
    full.unlink()
    (folder / "sizes.json").write_text(json.dumps({"d-000000.tar": 6, "d-000001.tar": 5, "d-000002.tar": 8}))
    return {n: _members(folder / n) for n in ("d-000000.tar", "d-000001.tar", "d-000002.tar")}


def test_negatives_cli_end_to_end(tmp_path):
    inputs = _input_shards(tmp_path / "in")
    out = tmp_path / "out"
    types = "replace_object,replace_attribute,swap_attributes"
    args = ["negatives", "--in", tmp_path / "in" / "d-{000000..000002}.tar", "--out", out, "--types", types, "--k", 3]
    proc = run_main(*args)
    assert "3 shard(s) written, 0 up to date" in proc.stdout
    assert f"data.train_shards={out}/d-{{000000..000002}}.tar" in proc.stdout
    summary = json.loads((out / "_negatives.json").read_text())
    skipped = {k: v for k, v in summary["skipped"].items() if v}
    assert skipped == {"shard_error": 1, "bad_caption_encoding": 1, "bad_json": 1, "missing_caption": 1}
    assert summary["params"]["k"] == 3 and summary["num_samples"] > 11

    outputs = {name: _members(out / name) for name in inputs}
    sizes = json.loads((out / "sizes.json").read_text())
    for name, members in inputs.items():
        got = outputs[name]
        keys = {m.split(".")[0] for m in members}
        if name == "d-000002.tar":  # truncated: the samples before the damage are all there
            assert 0 < sizes[name] < 8 and keys >= {m.split(".")[0] for m in got}
        else:
            assert sizes[name] == len(keys) and set(members) <= set(got)
        assert sizes[name] == len({m.split(".")[0] for m in got})
        for member, data in got.items():
            key, ext = member.split(".", 1)
            if ext != "json":
                assert data == members[member], member  # byte for byte
                continue
            meta = json.loads(data)
            original = json.loads(members[member]) if member in members else {}
            if key in ("000000011", "000000012"):  # bad caption, bad json: unchanged
                assert data == members[member]
                continue
            caption = got[f"{key}.txt"].decode()
            negatives = meta.pop("hard_negatives")
            assert meta == original and 0 < len(negatives) <= 3
            for negative in negatives:
                assert set(negative) == {"text", "type"} and negative["type"] in types.split(",")
                assert normalize(negative["text"]) != normalize(caption)
                if key == "000000000":  # another caption variant of the image is no negative
                    assert negative["text"] != "a red car next to a large house"
    assert "000000013.json" not in outputs["d-000001.tar"]
    assert "hard_negatives" in json.loads(outputs["d-000001.tar"]["000000010.json"])  # json added

    mtimes = {name: (out / name).stat().st_mtime_ns for name in inputs}
    again = run_main(*args)
    assert "0 shard(s) written, 3 up to date" in again.stdout and "up to date; not rewriting" in again.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in inputs} == mtimes

    (out / "d-000001.tar").unlink()  # a lost output is written again, the others are kept
    third = run_main(*args)
    assert "1 shard(s) written, 2 up to date" in third.stdout
    assert _members(out / "d-000001.tar") == outputs["d-000001.tar"]  # deterministic
    changed = run_main(*args[:-1], 2)  # other parameters: every shard is written again
    assert "3 shard(s) written, 0 up to date" in changed.stdout


def test_negatives_cli_errors(tmp_path):
    _input_shards(tmp_path / "in")
    pattern = tmp_path / "in" / "d-{000000..000001}.tar"
    proc = run_main("negatives", "--in", pattern, "--out", tmp_path / "o", "--types", "replace_color", check=False)
    assert proc.returncode == 2 and "replace_attribute" in proc.stderr
    proc = run_main("negatives", "--in", pattern, "--out", tmp_path / "in", check=False)
    assert proc.returncode == 2 and "input folder" in proc.stderr
    proc = run_main("negatives", "--in", tmp_path / "in" / "nope-{0..1}.tar", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = run_main("negatives", "--in", pattern, "--out", tmp_path / "o", "--generator", "lm", check=False)
    assert proc.returncode == 2 and "--lm-model" in proc.stderr
