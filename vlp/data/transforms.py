"""Image transforms for training and evaluation (open_clip's, parameterised by the tower)."""

from __future__ import annotations

from collections.abc import Sequence


def train_transform(size: int, mean: Sequence[float], std: Sequence[float], crop_scale=(0.9, 1.0)):
    """PIL image -> float tensor 3xSxS: random resized crop of ``crop_scale`` area, normalise."""
    import open_clip

    return open_clip.image_transform(size, is_train=True, mean=mean, std=std, aug_cfg={"scale": tuple(crop_scale)})


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]):
    """PIL image -> float tensor 3xSxS: resize the short side to S, centre crop, normalise."""
    import open_clip

    return open_clip.image_transform(size, is_train=False, mean=mean, std=std)
