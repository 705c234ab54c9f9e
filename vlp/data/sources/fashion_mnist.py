"""Fashion-MNIST idx files (Debian ``dataset-fashion-mnist``) -> ImageFolder classification layout.

    out_dir/train/00_t-shirt/00003.png ... out_dir/train/09_ankle_boot/...
    out_dir/train/classnames.txt, out_dir/train/templates.txt (the same under out_dir/test)
    out_dir/_info.json

File names are the image's index in its idx file; folder names sort in label order, which is
how :func:`vlp.eval.datasets.load_classification` numbers the classes, and ``classnames.txt``
gives them readable names. ``vlp eval --task zeroshot_classification --data out_dir/test``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlp.data.shards import INFO_FILE, ShardError, atomic_write_json

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSNAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = (
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a product photo of a {c}.",
    "a photo of a {c}, a fashion item.",
)
# split -> (images file, labels file); "test" is the t10k pair
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_UBYTE = 0x08
CONVERTER_VERSION = 1
INSTALL_HINT = (
    "install it with 'apt-get install -y --no-install-recommends dataset-fashion-mnist' (Debian/Ubuntu) "
    "or pass --source DIR"
)


def class_folder(label: int) -> str:
    """``00_t-shirt`` .. ``09_ankle_boot``: sorting the names sorts the labels."""
    return f"{label:02d}_{CLASSNAMES[label].replace(' ', '_')}"


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """An unsigned-byte idx array (gzip-compressed or not) with ``ndim`` dimensions.

    Raises ShardError naming the file: unreadable or bad gzip, a magic number other than
    ``00 00 08 <ndim>``, or a payload whose size does not match the header's dimensions.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise ShardError(f"{path}: cannot read the idx file: {e}") from None
    header = 4 + 4 * ndim
    magic = raw[:4]
    if len(raw) < header or magic != bytes([0, 0, IDX_UBYTE, ndim]):
        raise ShardError(
            f"{path}: not an unsigned-byte idx file with {ndim} dimension(s): magic number {magic.hex() or 'missing'}, "
            f"expected 000008{ndim:02x}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload = len(raw) - header
    if payload != int(np.prod(dims)):
        raise ShardError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes of data, the file has {payload}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N×H×W uint8, labels N) of one split; ShardError when the pair disagrees."""
    images_file, labels_file = (source / name for name in FILES[split])
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if len(images) != len(labels):
        raise ShardError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
    if len(labels) and labels.max() >= len(CLASSNAMES):
        raise ShardError(f"{labels_file}: label {labels.max()} outside the {len(CLASSNAMES)} classes")
    return images, labels


def select(labels: np.ndarray, per_class: int, seed: int, split: str) -> list[np.ndarray]:
    """Sorted indices of each class: all (``per_class`` 0), else ``per_class`` drawn without
    replacement by a generator seeded with (seed, split, class); a class with fewer keeps all."""
    chosen = []
    for label in range(len(CLASSNAMES)):
        indices = np.flatnonzero(labels == label)
        if 0 < per_class < len(indices):
            rng = np.random.default_rng([seed, list(FILES).index(split), label])
            indices = np.sort(rng.choice(indices, per_class, replace=False))
        chosen.append(indices)
    return chosen


def _write_png(image: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # a hidden .tmp: never read as a class image
    Image.fromarray(image, mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_split(out: Path, images: np.ndarray, chosen: list[np.ndarray], progress: bool) -> dict[str, int]:
    """Class folders (stale PNGs of an earlier selection removed), classnames.txt, templates.txt."""
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(len(c) for c in chosen), disable=None if progress else True, desc=out.name, unit="img")
    counts = {}
    for label, indices in enumerate(chosen):
        folder = out / class_folder(label)
        folder.mkdir(exist_ok=True)
        names = {f"{i:05d}.png": i for i in indices.tolist()}
        for stale in folder.glob("*.png"):
            if stale.name not in names:
                stale.unlink()
        for name, index in names.items():
            _write_png(images[index], folder / name)
            bar.update()
        counts[folder.name] = len(names)
    bar.close()
    (out / "classnames.txt").write_text("".join(f"{name}\n" for name in CLASSNAMES), encoding="utf-8")
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES), encoding="utf-8")
    return counts


def _up_to_date(out: Path, params: dict) -> dict | None:
    """The stored info when it has ``params`` and every class folder holds its PNG count."""
    try:
        info = json.loads((out / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in params.items()):
        return None
    for split in FILES:
        for folder, count in info.get("counts", {}).get(split, {}).items():
            if sum(1 for _ in (out / split / folder).glob("*.png")) != count:
                return None
        if not all((out / split / name).is_file() for name in ("classnames.txt", "templates.txt")):
            return None
    return info


def write_fashion_mnist(
    out_dir: str | os.PathLike,
    source: str | os.PathLike = DEFAULT_SOURCE,
    per_class_train: int = 0,
    per_class_test: int = 0,
    seed: int = 0,
    *,
    progress: bool = True,
) -> dict:
    """Write Fashion-MNIST as ``out_dir/{train,test}/<NN_class>/<index>.png`` (28×28 grey PNG).

    ``per_class_*`` > 0 keeps that many images of each class (seeded, see :func:`select`);
    0 keeps all (60,000 train, 10,000 test). Idempotent: ``out_dir/_info.json`` records the
    parameters and per-folder counts; when they match the files, nothing is rewritten.

    Returns:
        The _info.json dict: source, source_dir, per_class_train, per_class_test, seed,
        converter_version, classnames, templates, counts ({split: {folder: images}}),
        num_images ({split: images}), elapsed_s.

    Raises:
        FileNotFoundError: an idx file is missing (the message says how to install them).
        ShardError: a bad idx file (named), or a negative per-class count.
    """
    src = Path(source).expanduser().resolve()
    missing = [name for pair in FILES.values() for name in pair if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found at {source} (missing {', '.join(missing)}): {INSTALL_HINT}")
    if per_class_train < 0 or per_class_test < 0:
        raise ShardError(f"per-class counts must be >= 0, got {per_class_train} and {per_class_test}")
    out = Path(out_dir)
    params = {
        "source": "fashion-mnist",
        "source_dir": str(src),
        "source_sizes": [(src / name).stat().st_size for pair in FILES.values() for name in pair],
        "per_class_train": int(per_class_train),
        "per_class_test": int(per_class_test),
        "seed": int(seed),
        "converter_version": CONVERTER_VERSION,
    }
    if (existing := _up_to_date(out, params)) is not None:
        logger.info("Fashion-MNIST in %s is up to date; not rewriting", out)
        return existing
    start = time.monotonic()
    data = {split: _load_split(src, split) for split in FILES}  # every file is checked before writing
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)  # an interrupted rewrite is never taken as complete
    counts = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = data[split]
        counts[split] = _write_split(out / split, images, select(labels, per_class, seed, split), progress)
    info = {
        **params,
        "classnames": list(CLASSNAMES),
        "templates": list(TEMPLATES),
        "counts": counts,
        "num_images": {split: sum(c.values()) for split, c in counts.items()},
        "elapsed_s": round(time.monotonic() - start, 1),
    }
    atomic_write_json(out / INFO_FILE, info)
    return info
