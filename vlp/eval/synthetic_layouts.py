"""Export the synthetic shapes data (held-out indices) into every evaluation layout.

``out_dir`` gets::

    classification/<color>_<shape>/<index>.png   single-group scenes, all 36 class folders
    classification/classnames.txt               plural phrases ("blue circles"), folder-sorted
    classification/templates.txt                synthetic.ZEROSHOT_TEMPLATES
    retrieval.jsonl   + retrieval/<index>.png   {"image", "captions": [caption, rephrased]}
    compositional.jsonl + compositional/<index>.png
                      {"image", "positive", "negatives": [one], "type"}: one row per negative type
                      of NEGATIVE_TYPES per scene, then one swap_size row per scene of its own
    counting.jsonl    + counting/<index>.png    {"image", "caption", "count"} with count in 2..6
    _layouts.json                               parameters and paths, written last

Each layout draws its scenes from its own block of indices (``start_index + k * INDEX_BLOCK``, k in
SCENE_BLOCKS order), so no image is shared between layouts; scenes a layout cannot use are skipped
deterministically. The swap_size rows have their own block: a size swap needs two groups of
different sizes whose caption names both sizes (about one two-group scene in nine), and drawing
those from the other types' scenes would change which scenes the other types test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlp.data import synthetic
from vlp.data.synthetic_counterfactual import CHANGE_TYPES, changed_groups, describes, phrase, size_flags

LAYOUTS_FILE = "_layouts.json"
LAYOUTS_VERSION = 2  # bump when the files written for given parameters change (2: swap_size rows)
INDEX_BLOCK = 1_000_000  # indices per layout; a layout may use at most this many scenes
COUNT_RANGE = (2, 6)
NEGATIVE_TYPES = CHANGE_TYPES  # one row of each per scene of the compositional block
SIZE_SWAP = "swap_size"  # the two groups' size words swapped; scenes of the compositional_size block
LAYOUT_DIRS = {
    "zeroshot_classification": "classification",
    "zeroshot_retrieval": "retrieval",
    "compositional": "compositional",
    "counting": "counting",
}
SCENE_BLOCKS = (*LAYOUT_DIRS, "compositional_size")  # index block k of start_index + k * INDEX_BLOCK


def folder_name(label: str) -> str:
    """Class folder of a shapes label: "red circle" -> "red_circle"."""
    return label.replace(" ", "_")


def rephrase(scene: synthetic.Scene) -> str:
    """A second true caption: the groups in reverse order, each with its size word toggled."""
    groups = scene.meta["groups"]
    flags = size_flags(groups, scene.caption)
    return phrase(groups[::-1], tuple(not f for f in flags[::-1]))


def negative_groups(scene: synthetic.Scene, seed: int) -> dict[str, list[dict]] | None:
    """``{type: the scene's groups as that negative caption describes them}`` for NEGATIVE_TYPES of
    a 2-group scene, or None if the scene has no valid set (not 2 groups, or a changed caption
    still true of the image).

    swap_attribute swaps the groups' colours; replace_attribute gives one group a colour absent
    from the scene; replace_object gives one group a shape absent from the scene.
    """
    groups = scene.meta["groups"]
    if len(groups) != 2:
        return None
    flags = size_flags(groups, scene.caption)
    rng = np.random.default_rng([seed, scene.meta["index"], 1])  # apart from make_scene's stream
    changed = {kind: changed_groups(groups, kind, rng) for kind in NEGATIVE_TYPES}
    if any(describes(new, flags, groups) for new in changed.values()):
        return None
    return changed


def negatives(scene: synthetic.Scene, seed: int) -> dict[str, str] | None:
    """``{type: caption}`` of :func:`negative_groups`, or None. Phrasing (order, size words) is the
    positive caption's, so only the changed attribute differs."""
    changed = negative_groups(scene, seed)
    if changed is None:
        return None
    flags = size_flags(scene.meta["groups"], scene.caption)
    return {kind: phrase(new, flags) for kind, new in changed.items()}


def size_swap(scene: synthetic.Scene) -> str | None:
    """The caption with its two groups' size words swapped ("two small red circles and a large blue
    star" -> "two large red circles and a small blue star"), or None unless the scene has two
    groups of different sizes, its caption names both sizes (otherwise no swap makes it false) and
    the swapped groups are ``synthetic.drawable``.

    Colour, shape, count and order stay the positive's, so a model that reads the caption as a bag
    of words sees the same words; only which group is which size tells the two apart. A swap that
    makes a group of four small objects large describes no training image (large groups hold at
    most three), so the caption alone would give it away: such scenes are skipped.
    """
    groups = scene.meta["groups"]
    if len(groups) != 2 or groups[0]["size"] == groups[1]["size"]:
        return None
    flags = size_flags(groups, scene.caption)
    a, b = groups
    swapped = [{**a, "size": b["size"]}, {**b, "size": a["size"]}]
    if not all(flags) or not synthetic.drawable(swapped):
        return None
    return phrase(swapped, flags)


def layout_start(layout: str, start_index: int) -> int:
    """First scene index of ``layout``'s block (one of SCENE_BLOCKS) when export_eval_layouts is
    given ``start_index``."""
    return start_index + SCENE_BLOCKS.index(layout) * INDEX_BLOCK


def accepted_scenes(seed: int, start: int, num: int, build: Callable, desc: str, progress: bool, **kwargs) -> Iterator:
    """``(scene, build(scene))`` for the first ``num`` scenes from ``start`` on where build is not None.

    Raises:
        ValueError: fewer than ``num`` usable scenes within INDEX_BLOCK indices.
    """
    bar = tqdm(total=num, desc=desc, unit="img", disable=None if progress else True, leave=False)
    made = 0
    for index in range(start, start + INDEX_BLOCK):
        if made == num:
            break
        scene = synthetic.make_scene(seed, index, **kwargs)
        result = build(scene)
        if result is not None:
            made += 1
            bar.update(1)
            yield scene, result
    bar.close()
    if made < num:
        raise ValueError(f"{desc}: only {made} usable scenes in {INDEX_BLOCK} indices; lower num_images")


def layout_summary(out_dir: str | os.PathLike, num_images: int) -> str:
    """One line saying what :func:`export_eval_layouts` writes for ``num_images``, to print first."""
    return (
        f"writing the eval layouts ({', '.join(LAYOUT_DIRS.values())}) to {out_dir}: {len(SCENE_BLOCKS) * num_images} "
        f"scenes, {num_images} per layout plus {num_images} swap_size scenes for compositional (--num-samples sets "
        "the number; 10000 take minutes)"
    )


def _ticking(items: Iterator, bar: tqdm, name: str) -> Iterator:
    """``items``, advancing ``bar`` by one for each and showing ``name`` beside it."""
    bar.set_postfix_str(name, refresh=False)
    for item in items:
        bar.update(1)
        yield item


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically."""
    _write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _save(scene: synthetic.Scene, folder: Path) -> str:
    """Save the scene as ``folder/<index>.png``; returns its path relative to folder's parent."""
    name = f"{scene.meta['index']}.png"
    scene.image.save(folder / name, format="PNG")
    return f"{folder.name}/{name}"


def _class_folders() -> dict[str, str]:
    """Class folder name -> plural class phrase, sorted by folder name (ImageFolder order)."""
    pairs = zip(synthetic.class_names(), synthetic.zeroshot_classnames())
    return dict(sorted((folder_name(label), plural) for label, plural in pairs))


def _classification(out: Path, scenes: Iterator) -> None:
    """Class folders (all 36), one PNG per scene in its class's folder, classnames/templates.txt."""
    root = out / LAYOUT_DIRS["zeroshot_classification"]
    folders = _class_folders()
    for name in folders:  # every class, even one without images: zero-shot scores all of them
        (root / name).mkdir(parents=True, exist_ok=True)
    for scene, _ in scenes:
        _save(scene, root / folder_name(scene.meta["label"]))
    _write_text(root / "classnames.txt", "".join(f"{plural}\n" for plural in folders.values()))
    _write_text(root / "templates.txt", "".join(f"{t}\n" for t in synthetic.ZEROSHOT_TEMPLATES))


def _rows(out: Path, layout: str, scenes: Iterator, make_rows: Callable) -> list[dict]:
    """Save each scene's PNG under ``out/<layout dir>``; the rows ``make_rows(image, scene, built)``."""
    folder = out / LAYOUT_DIRS[layout]
    folder.mkdir(parents=True, exist_ok=True)
    return [row for scene, built in scenes for row in make_rows(_save(scene, folder), scene, built)]


def _count_in_range(scene: synthetic.Scene) -> int | None:
    """The single group's count when it lies in COUNT_RANGE, else None (scene not used)."""
    count = scene.meta["groups"][0]["count"]
    return count if COUNT_RANGE[0] <= count <= COUNT_RANGE[1] else None


def _retrieval_rows(image: str, scene: synthetic.Scene, second: str) -> list[dict]:
    """One row: the scene's caption and its rephrasing."""
    return [{"image": image, "captions": [scene.caption, second]}]


def _compositional_rows(image: str, scene: synthetic.Scene, negs: dict[str, str]) -> list[dict]:
    """One row per negative type, each with the scene's caption as the positive."""
    return [{"image": image, "positive": scene.caption, "negatives": [negs[t]], "type": t} for t in NEGATIVE_TYPES]


def _size_swap_row(image: str, scene: synthetic.Scene, negative: str) -> list[dict]:
    """One swap_size row: the scene's caption and that caption with the sizes swapped."""
    return [{"image": image, "positive": scene.caption, "negatives": [negative], "type": SIZE_SWAP}]


def _counting_rows(image: str, scene: synthetic.Scene, count: int) -> list[dict]:
    """One row: the scene's caption (it names the count) and the count."""
    return [{"image": image, "caption": scene.caption, "count": count}]


def _remove_old_images(out: Path) -> None:
    """Delete PNGs of an earlier export (a smaller one would leave stale images behind)."""
    folders = [out / LAYOUT_DIRS["zeroshot_classification"] / name for name in _class_folders()]
    folders += [out / LAYOUT_DIRS[k] for k in ("zeroshot_retrieval", "compositional", "counting")]
    for folder in folders:
        for png in folder.glob("*.png") if folder.is_dir() else ():
            png.unlink()


def _layout_paths(out: Path) -> dict[str, str]:
    """Task name -> path to load: the classification folder, else the layout's JSONL file."""
    paths = {k: out / (d if k == "zeroshot_classification" else f"{d}.jsonl") for k, d in LAYOUT_DIRS.items()}
    return {k: str(p) for k, p in paths.items()}


def _up_to_date(out: Path, params: dict) -> bool:
    """Whether ``_layouts.json`` records ``params`` and every layout path exists."""
    try:
        stored = json.loads((out / LAYOUTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored.get("params") == params and all(os.path.exists(p) for p in _layout_paths(out).values())


def export_eval_layouts(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 500,
    seed: int = 0,
    start_index: int = 10_000_000,
    image_size: int = 64,
    progress: bool = True,
) -> dict[str, str]:
    """Write the classification, retrieval, compositional and counting layouts (module docstring).

    ``num_images`` scenes per layout (compositional: 3 rows per scene, one per negative type, then
    ``num_images`` swap_size rows from scenes of their own). Idempotent: when ``_layouts.json``
    holds the same parameters nothing is rewritten.

    Returns:
        ``{task name: path}`` for vlp.eval.registry.load_eval_data: zeroshot_classification ->
        the class-folder root, zeroshot_retrieval/compositional/counting -> their JSONL files.

    Raises:
        ValueError: num_images < 1 or > INDEX_BLOCK, or bad seed/start_index/image_size.
    """
    if not 1 <= num_images <= INDEX_BLOCK:
        raise ValueError(f"num_images must be in 1..{INDEX_BLOCK}, got {num_images}")
    # checked before anything is deleted; make_scene would only raise after the cleanup
    synthetic.make_scene(seed, start_index, image_size=image_size)
    out = Path(out_dir)
    params = {"num_images": int(num_images), "seed": int(seed), "start_index": int(start_index)}
    params["image_size"] = int(image_size)
    params.update(generator_version=synthetic.SYNTHETIC_VERSION, layouts_version=LAYOUTS_VERSION)
    if _up_to_date(out, params):
        return _layout_paths(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / LAYOUTS_FILE).unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    _remove_old_images(out)

    # (scene block, layout its rows go to, scene -> what its rows need or None to skip the scene,
    #  single-group scenes?, row maker); each layout's JSONL holds its blocks' rows in plan order
    plan = (
        ("zeroshot_classification", "zeroshot_classification", lambda scene: True, True, None),
        ("zeroshot_retrieval", "zeroshot_retrieval", rephrase, False, _retrieval_rows),
        ("compositional", "compositional", lambda scene: negatives(scene, seed), False, _compositional_rows),
        ("compositional_size", "compositional", size_swap, False, _size_swap_row),
        ("counting", "counting", _count_in_range, True, _counting_rows),
    )
    rows: dict[str, list[dict]] = {}
    # one bar for the whole export (minutes at the CLI's 10,000 scenes per layout), the block as its postfix
    with tqdm(total=len(plan) * num_images, desc="eval layouts", unit="img", disable=None if progress else True) as bar:
        for block, layout, build, single_group, make_rows in plan:
            kwargs = {"image_size": image_size, "single_group": single_group}
            scenes = accepted_scenes(seed, layout_start(block, start_index), num_images, build, block, False, **kwargs)
            scenes = _ticking(scenes, bar, block)
            if make_rows is None:
                _classification(out, scenes)
            else:
                rows.setdefault(layout, []).extend(_rows(out, layout, scenes, make_rows))
    for layout, layout_rows in rows.items():
        _write_jsonl(out / f"{LAYOUT_DIRS[layout]}.jsonl", layout_rows)
    _write_text(out / LAYOUTS_FILE, json.dumps({"params": params, "layouts": LAYOUT_DIRS}, indent=2) + "\n")
    return _layout_paths(out)
