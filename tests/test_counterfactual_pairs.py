"""Minimal pairs of shapes scenes: the counterfactual changes one attribute, in the caption and only
in the changed objects' pixels; shards hold each scene beside its counterfactual, the stream gives
both the same ``pair_id``, and the trainer's objective adds the pair loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO

from tests.test_stream import _loader, _take
from vlp.data import synthetic
from vlp.data.extra_captions import EPOCH_WRAP, PAIR_ID_LIMIT, ExtraCaptionSpec
from vlp.data.shards import write_synthetic_shards
from vlp.data.synthetic_counterfactual import (
    CHANGE_TYPES,
    counterfactual_group,
    counterfactual_scene,
    describes,
    size_flags,
)
from vlp.losses.hard_negatives import pair_groups


def _changed_pixels_inside_changed_objects(scene, cf) -> bool:
    a, b = np.asarray(scene.image, dtype=int), np.asarray(cf.image, dtype=int)
    ys, xs = np.nonzero(np.abs(a - b).sum(-1))
    changed = [
        o
        for o, n in zip(scene.meta["objects"], cf.meta["objects"])
        if (o["shape"], o["color"]) != (n["shape"], n["color"])
    ]
    near = np.zeros(len(xs), dtype=bool)
    for o in changed:  # pixel centres within the object's bounding circle (+1 pixel of anti-aliasing)
        near |= (xs + 0.5 - o["x"]) ** 2 + (ys + 0.5 - o["y"]) ** 2 <= (o["r"] + 1) ** 2
    return bool(changed) and len(xs) > 0 and bool(near.all())


def test_a_counterfactual_changes_one_attribute_and_only_its_objects():
    kinds_seen = set()
    for index in range(60):
        scene, cf = counterfactual_scene(3, index, CHANGE_TYPES)
        reference = synthetic.make_scene(3, index)
        assert scene.caption == reference.caption and np.array_equal(
            np.asarray(scene.image), np.asarray(reference.image)
        )
        assert cf is not None  # a colour or a shape absent from the scene always exists
        groups, new = scene.meta["groups"], cf.meta["groups"]
        flags = size_flags(groups, scene.caption)
        assert size_flags(new, cf.caption) == flags  # same phrasing: order and size words
        assert cf.caption != scene.caption and not describes(new, flags, groups)
        differing = [(g, n) for g, n in zip(groups, new) if g != n]
        kind = cf.meta["counterfactual"]
        kinds_seen.add(kind)
        if kind == "swap_attribute":
            assert len(differing) == 2 and [n["color"] for n in new] == [g["color"] for g in groups[::-1]]
        else:
            key = "color" if kind == "replace_attribute" else "shape"
            assert len(differing) == 1 and [k for k in differing[0][0] if differing[0][0][k] != differing[0][1][k]] == [
                key
            ]
            assert differing[0][1][key] not in {g[key] for g in groups}
        assert [(o["x"], o["y"], o["r"]) for o in cf.meta["objects"]] == [
            (o["x"], o["y"], o["r"]) for o in scene.meta["objects"]
        ]
        assert _changed_pixels_inside_changed_objects(scene, cf), index
    assert kinds_seen == set(CHANGE_TYPES)


def test_swaps_need_two_groups_and_kinds_are_checked():
    one = next(i for i in range(100) if len(synthetic.make_scene(0, i).meta["groups"]) == 1)
    assert counterfactual_scene(0, one, ("swap_attribute",))[1] is None
    with pytest.raises(ValueError, match="non-empty subset"):
        counterfactual_scene(0, 0, ("swap",))


def test_pair_shards_keep_partners_side_by_side_and_the_stream_ids_them(tmp_path):
    kinds = ("swap_attribute",)
    info = write_synthetic_shards(
        tmp_path, 24, seed=1, max_samples_per_shard=8, counterfactual_pairs=kinds, progress=False
    )
    assert info["num_samples"] == 24 and info["counterfactual_pairs"] == ["swap_attribute"]
    assert info["skipped"]["no_counterfactual"] > 0  # one-group scenes have nothing to swap
    spec = ExtraCaptionSpec(pairs=True)
    batch = next(iter(_loader(str(tmp_path / info["shards"]), batch_size=8, extras=spec, shuffle_buffer=0)))
    ids = batch["pair_id"]
    assert ids.dtype.is_floating_point is False and ids[0::2].tolist() == ids[1::2].tolist()
    assert pair_groups(ids)[1].all()
    for a, b, meta in zip(batch["caption"][0::2], batch["caption"][1::2], batch["json"][1::2]):
        words = [sorted("a" if w == "an" else w for w in c.split()) for c in (a, b)]  # "an orange" -> "a yellow"
        assert a != b and words[0] == words[1] and meta["counterfactual"] == "swap_attribute"
    # samples without a pair get -1; a batch without the option has no pair_id
    plain = write_synthetic_shards(tmp_path / "plain", 8, seed=1, max_samples_per_shard=8, progress=False)
    batch = next(iter(_loader(str(tmp_path / "plain" / plain["shards"]), batch_size=8, extras=spec)))
    assert batch["pair_id"].tolist() == [-1] * 8
    assert "pair_id" not in next(iter(_loader(str(tmp_path / "plain" / plain["shards"]), batch_size=8)))


def test_pair_units_group_adjacent_samples_with_one_id():
    from vlp.data.stream import pair_units

    raw = [{"json": json.dumps({"pair": p}).encode()} for p in (5, 5, None, 7, 7, 7, 8, 8, 8, 8, 8)]
    raw += [{"json": b"{not json"}, {"__key__": "no-json"}, {"json": b'{"pair": 9}'}]
    ids = [[json.loads(s["json"]).get("pair") if s.get("json", b"{").startswith(b'{"') else "x" for s in unit]
           for unit in pair_units(iter(raw))]  # fmt: skip
    # at most PAIR_GROUP_LIMIT (4) samples per unit: a fifth with the same id starts a unit of its own
    assert ids == [[5, 5], [None], [7, 7, 7], [8, 8, 8, 8], [8], ["x"], ["x"], [9]]


def test_pair_ids_of_mixed_sources_never_collide(tmp_path):
    from vlp.data.extra_captions import pair_id

    assert pair_id({"json": {"pair": PAIR_ID_LIMIT - 1}}) == PAIR_ID_LIMIT - 1
    assert pair_id({"json": {"pair": PAIR_ID_LIMIT}}) == pair_id({"json": {"pair": True}}) == -1
    # two sources whose JSON ids are the same scene indices (both start at 0)
    patterns = []
    for kind in ("swap_attribute", "replace_object"):
        info = write_synthetic_shards(
            tmp_path / kind, 32, seed=3, max_samples_per_shard=32, counterfactual_pairs=(kind,), progress=False
        )
        patterns.append(str(tmp_path / kind / info["shards"]))
    batch = next(iter(_loader(patterns, batch_size=32, shuffle_buffer=0, extras=ExtraCaptionSpec(pairs=True))))
    ids = batch["pair_id"]
    source = ids // (EPOCH_WRAP * PAIR_ID_LIMIT)
    assert set(source.tolist()) == {0, 1} and (ids >= 0).all()
    json_ids = [m["pair"] for m in batch["json"]]
    assert {p for p, s in zip(json_ids, source) if s == 0} & {p for p, s in zip(json_ids, source) if s}
    # the JSON ids collide, yet each row's partner is its own source's: only a pair cut by the end of
    # the batch has none
    assert max(ids.tolist().count(p) for p in ids.tolist()) == 2
    assert pair_groups(ids)[1].sum() >= len(ids) - 2


def test_pair_ids_repeated_in_other_shards_of_one_source_never_join(tmp_path):
    # two sets whose JSON ids and keys are the same scene indices, read as one source
    for name, seed in (("a", 3), ("b", 4)):
        info = write_synthetic_shards(
            tmp_path / name, 16, seed=seed, max_samples_per_shard=8, counterfactual_pairs=("swap_attribute",),
            progress=False,
        )  # fmt: skip
    pattern = str(tmp_path / "{a,b}" / info["shards"])
    for buffer in (0, 16):
        kw = dict(batch_size=32, shuffle_buffer=buffer, seed=1, extras=ExtraCaptionSpec(pairs=True))
        batch = next(iter(_loader(pattern, **kw)))
        json_ids = [m["pair"] for m in batch["json"]]
        assert max(json_ids.count(p) for p in json_ids) == 4  # each JSON id twice per set ...
        ids = batch["pair_id"].tolist()
        assert sorted(ids.count(p) for p in set(ids)) == [2] * 16  # ... but each batch id on its pair only
        assert pair_groups(batch["pair_id"])[1].all()
        for i in range(0, 32, 2):  # the pairs stay side by side, each scene with its own counterfactual
            assert ids[i] == ids[i + 1] and batch["image"][i].ne(batch["image"][i + 1]).any()


def test_the_shuffle_buffer_moves_pairs_whole_and_resumes_exactly(tmp_path):
    info = write_synthetic_shards(
        tmp_path, 48, seed=2, max_samples_per_shard=8, counterfactual_pairs=CHANGE_TYPES, progress=False
    )
    pattern = str(tmp_path / info["shards"])
    kw = dict(batch_size=8, shuffle_buffer=16, seed=4)
    in_order = [k for b in _take(_loader(pattern, batch_size=8, shuffle_buffer=0), 6) for k in b["__key__"]]
    full = _take(_loader(pattern, extras=ExtraCaptionSpec(pairs=True), **kw), 9)
    epoch = [k for b in full[:6] for k in b["__key__"]]
    assert sorted(epoch) == sorted(in_order) and epoch != in_order  # each sample once, in a new order
    for b in full:
        assert b["pair_id"][0::2].tolist() == b["pair_id"][1::2].tolist() and (b["pair_id"] >= 0).all()
    # a plain buffer (no pair loss) splits pairs
    plain = _take(_loader(pattern, **kw), 6)
    assert any(b["json"][0]["pair"] != b["json"][1]["pair"] for b in plain)
    first = _loader(pattern, extras=ExtraCaptionSpec(pairs=True), **kw)
    head = _take(first, 4)
    tail = _take(_loader(pattern, extras=ExtraCaptionSpec(pairs=True), state=first.state_dict(), **kw), 5)
    assert [b["__key__"] for b in full] == [b["__key__"] for b in head + tail]


def test_a_group_has_one_counterfactual_of_every_kind():
    kinds = ("swap_attribute", "replace_object")
    groups = 0
    for index in range(40):
        scene, members = counterfactual_group(5, index, kinds)
        _, cf = counterfactual_scene(5, index, kinds)
        if len(scene.meta["groups"]) != 2 or len({g["color"] for g in scene.meta["groups"]}) != 2:
            assert members == [] and (cf is None or cf.meta["counterfactual"] == "replace_object")
            continue
        groups += 1
        assert [m.meta["counterfactual"] for m in members] == list(kinds)
        # the pair's counterfactual is one of the group's, drawn from the same changes
        assert cf.caption in [m.caption for m in members]
        flags = size_flags(scene.meta["groups"], scene.caption)
        captions = {scene.caption, *(m.caption for m in members)}
        assert len(captions) == 3 and not any(describes(m.meta["groups"], flags, scene.meta["groups"]) for m in members)
        assert all(_changed_pixels_inside_changed_objects(scene, m) for m in members)
    assert 5 <= groups < 40
    two = next(i for i in range(40) if len(counterfactual_group(5, i, kinds)[1]) == 2)
    assert [m.meta["counterfactual"] for m in counterfactual_group(5, two, CHANGE_TYPES[::-1])[1]] == [
        "replace_object", "replace_attribute", "swap_attribute"
    ]  # fmt: skip


def test_group_shards_keep_each_group_together_in_the_stream(tmp_path):
    kinds = ("swap_attribute", "replace_object")
    info = write_synthetic_shards(
        tmp_path, 48, seed=1, max_samples_per_shard=12, counterfactual_pairs=kinds, every_kind=True, progress=False
    )
    assert info["every_kind"] is True and info["num_samples"] == 48 and info["num_shards"] == 4
    assert info["skipped"]["no_counterfactual"] > 0  # scenes without two differently coloured groups
    pattern = str(tmp_path / info["shards"])
    spec = ExtraCaptionSpec(pairs=True)
    for buffer in (0, 12):
        batches = _take(_loader(pattern, batch_size=12, shuffle_buffer=buffer, seed=3, extras=spec), 4)
        for b in batches:
            ids = b["pair_id"].tolist()
            assert ids[0::3] == ids[1::3] == ids[2::3] and len(set(ids)) == 4  # side by side, whole
            assert pair_groups(b["pair_id"])[1].all()
            assert [m.get("counterfactual") for m in b["json"][:3]] == [None, *kinds]
            keys = b["__key__"]
            assert keys[1::3] == [k + "_cf0" for k in keys[0::3]] and keys[2::3] == [k + "_cf1" for k in keys[0::3]]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_samples": 7}, "multiples of 2"),
        ({"max_samples_per_shard": 5}, "multiples of 2"),
        ({"single_group": True}, "single_group off"),
        ({"counterfactual_pairs": ("replace_colour",)}, "unknown kinds"),
        ({"every_kind": True, "counterfactual_pairs": ("replace_object", "swap_attribute")}, "multiples of 3"),
        ({"every_kind": True, "counterfactual_pairs": ("replace_object",) * 2}, "distinct kinds"),
        ({"every_kind": True, "counterfactual_pairs": ()}, "every_kind needs counterfactual_pairs"),
    ],
)
def test_pair_shards_reject_what_cannot_pair(tmp_path, kw, match):
    args = {"num_samples": 8, "max_samples_per_shard": 8, "counterfactual_pairs": ("replace_object",), **kw}
    with pytest.raises(ValueError, match=match):
        write_synthetic_shards(tmp_path, args.pop("num_samples"), progress=False, **args)


def test_the_cli_writes_pairs_and_explains_bad_arguments(tmp_path, capsys):
    from vlp.cli import main

    assert main(["shards", "--synthetic", "--out", str(tmp_path / "p"), "--num-samples", "4",
                 "--counterfactual-pairs", "replace_object,swap_attribute"]) == 0  # fmt: skip
    info = json.loads((tmp_path / "p" / "_info.json").read_text())
    assert info["counterfactual_pairs"] == ["replace_object", "swap_attribute"] and info["num_samples"] == 4
    assert main(["shards", "--synthetic", "--out", str(tmp_path / "q"), "--num-samples", "4",
                 "--counterfactual-pairs", "swap"]) == 2  # fmt: skip
    assert "unknown kinds ['swap']" in capsys.readouterr().err
    assert main(["shards", "--synthetic", "--out", str(tmp_path / "g"), "--num-samples", "6", "--every-kind",
                 "--counterfactual-pairs", "replace_object,swap_attribute",
                 "--max-samples-per-shard", "6"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "g" / "_info.json").read_text())["every_kind"] is True
    assert main(["shards", "--synthetic", "--out", str(tmp_path / "h"), "--num-samples", "4", "--every-kind"]) == 2
    assert "every_kind needs counterfactual_pairs" in capsys.readouterr().err


def test_trainer_adds_the_pair_loss(tmp_path):
    from vlp.config import load_config
    from vlp.train.logging import read_metrics
    from vlp.train.trainer import Trainer

    info = write_synthetic_shards(
        tmp_path / "pairs", 64, seed=1, max_samples_per_shard=32, counterfactual_pairs=CHANGE_TYPES, progress=False
    )
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.train_shards=['{tmp_path / 'pairs' / info['shards']}']", "data.val_shards=[]", "eval.data=[]",
            "eval.tasks=[]", "data.workers=0", "data.batch_size=8", "data.shuffle_buffer=0", "loss.pair_weight=2.0",
            f"train.output_dir={tmp_path / 'run'}", "train.steps=3", "train.log_every=1", "train.checkpoint_every=0",
        ],
    )  # fmt: skip
    Trainer(cfg).train()
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    # each row's two terms start near 2 log 2 (equal similarities) and stay finite
    assert 0 < last["loss/pair"] < 20
    assert last["loss"] == pytest.approx(last["loss/contrastive"] + 2.0 * last["loss/pair"], rel=1e-4)
    assert last["data/paired_fraction"] == 1.0  # batches of 8 from shards of 32 in order: every row paired


def test_a_pair_loss_without_pairs_warns(shapes_shards, tmp_path, capsys):
    from vlp.config import load_config
    from vlp.train.logging import read_metrics
    from vlp.train.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.train_shards=['{shapes_shards['train']}']", "data.val_shards=[]", "eval.data=[]", "eval.tasks=[]",
            "data.workers=0", "data.batch_size=8", "loss.pair_weight=1.0", f"train.output_dir={tmp_path}",
            "train.steps=2", "train.log_every=1", "train.checkpoint_every=0", "train.progress=off",
        ],
    )  # fmt: skip
    Trainer(cfg).train()
    assert capsys.readouterr().out.count("no training sample so far had a partner") == 1
    last = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    assert last["data/paired_fraction"] == 0.0 and last["loss/pair"] == 0.0
