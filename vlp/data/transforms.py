"""Image transforms for training and evaluation (open_clip's crops, parameterised by the tower).

Training images leave the data loader as uint8 (``train_transform``) and become the model's float
input on the device, in one place (:class:`DeviceNormalize`): a quarter of the bytes to collate,
pin and copy, and the float arithmetic runs where it is cheapest. The evaluation transform returns
normalised float tensors, as open_clip's does.

Reduced-scale JPEG decoding (``draft_min_side``): a random resized crop of area fraction >= s_min
and aspect ratio in [3/4, 4/3] of a W x H image has a short side >= sqrt(s_min * 3/4 * W * H)
>= sqrt(s_min * 3/4) * min(W, H). Decoding at a scale that keeps min(W, H) >= S / sqrt(s_min * 3/4)
therefore keeps every crop's short side >= the output size S: the crop is still only ever scaled
down, never up, exactly as at full resolution. For S = 224 and s_min = 0.9 that is 273 px, so a
photo of 546 px or more on its short side decodes at 1/2 scale, 1092 px or more at 1/4. The crop
distribution, as fractions of the image, is unchanged (up to the coarser integer grid of the crop
corners); the pixels differ slightly: libjpeg's scaled inverse DCT averages blocks before the
bicubic resize, where a full decode lets the bicubic filter do all of the reduction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the random resized crop (torchvision's and open_clip's)


def draft_min_side(size: int, crop_scale: Sequence[float]) -> int:
    """The short side a training image must keep when decoded at reduced scale, in pixels, so
    that every random resized crop of ``crop_scale`` still covers >= ``size`` pixels per side
    (see the module docstring); 0 (never reduce) when crops may be arbitrarily small."""
    smallest = min(crop_scale[0], 1.0) * min(CROP_RATIO[0], 1 / CROP_RATIO[1])
    return math.ceil(size / math.sqrt(smallest)) if smallest > 0 else 0


def _rgb(image):
    return image if image.mode == "RGB" else image.convert("RGB")


class TrainCrop:
    """PIL image -> uint8 tensor 3xSxS: open_clip's training crop, resized by torch's uint8 kernel.

    The random resized crop draws its box exactly as torchvision's ``RandomResizedCrop`` (same
    calls on torch's generator, so the same boxes as open_clip's training transform for the same
    seed). The box is then cut from the image's pixels without a copy and resized by
    ``F.interpolate(mode="bicubic", antialias=True)`` on uint8, which computes Pillow's bicubic
    filter with integer SIMD arithmetic: about 1% of the pixels differ from Pillow's, by one level
    of 255 (two at a few sharp edges), and resizing takes about 5x less time
    (``tools/bench/data.py``). The result is a channels-last view (3 x S x S over S x S x 3
    memory); the batch's collate makes it contiguous.
    """

    def __init__(self, size: int, crop_scale: Sequence[float] = (0.9, 1.0)):
        from torchvision.transforms import RandomResizedCrop

        self.size, self.scale = int(size), (float(crop_scale[0]), float(crop_scale[1]))
        self._box = RandomResizedCrop.get_params  # resolved once, not per image

    def __call__(self, image) -> torch.Tensor:
        image = _rgb(image)
        top, left, h, w = self._box(image, self.scale, CROP_RATIO)
        with warnings.catch_warnings():  # Pillow's array is read-only, and nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(image))
        box = pixels[top : top + h, left : left + w].permute(2, 0, 1).unsqueeze(0)
        out = F.interpolate(box, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        return out[0]

    def __repr__(self) -> str:
        return f"TrainCrop(size={self.size}, scale={self.scale}, ratio={CROP_RATIO}, resize=torch-bicubic-antialias)"


def train_transform(size: int, crop_scale: Sequence[float] = (0.9, 1.0), resize: str = "torch"):
    """PIL image -> uint8 tensor 3xSxS: random resized crop of ``crop_scale`` area, bicubic.

    ``resize="torch"`` (default): :class:`TrainCrop`, within two levels of 255 of open_clip's
    pixels (most within none) and several times faster. ``resize="pil"``: Pillow's resize, the
    same random numbers and the same pixels as open_clip's training transform
    (``open_clip.image_transform(S, is_train=True, aug_cfg={"scale": ...})``):
    ``DeviceNormalize`` of the result equals open_clip's float output exactly.
    """
    if resize == "torch":
        return TrainCrop(size, crop_scale)
    if resize != "pil":
        raise ValueError(f"resize must be 'torch' or 'pil', got {resize!r}")
    from torchvision.transforms import Compose, InterpolationMode, PILToTensor, RandomResizedCrop

    crop = RandomResizedCrop(size, scale=tuple(crop_scale), ratio=CROP_RATIO, interpolation=InterpolationMode.BICUBIC)
    return Compose([crop, _rgb, PILToTensor()])


def eval_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
):
    """PIL image -> float tensor 3xSxS, open_clip's evaluation transform: ``resize_mode``
    ``shortest`` resizes the short side to S and centre-crops, ``squash`` resizes to S x S,
    ``longest`` resizes the long side to S and pads; ``interpolation`` bicubic or bilinear; normalise."""
    import open_clip

    return open_clip.image_transform(
        size, is_train=False, mean=mean, std=std, interpolation=interpolation or None, resize_mode=resize_mode or None
    )


class DeviceNormalize:
    """The model's image input from a batch's ``image``, on ``device``: every consumer of training
    batches (the step's forward, the momentum teacher) goes through this one function.

    uint8 ``B x 3 x H x W`` (the training stream's) -> float32 ``(x / 255 - mean) / std``, computed
    on ``device`` after the copy, with the same operations as torchvision's ``ToTensor`` +
    ``Normalize`` (so the values are bit-identical to the float pipeline's). A floating-point
    tensor is taken as already preprocessed (evaluation transforms, cached trunk features, tests)
    and only moved.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(3, 1, 1)
            self._constants[device] = mean, std
        return self._constants[device]

    def __call__(self, images: torch.Tensor, device) -> torch.Tensor:
        device = torch.device(device)
        x = images.to(device, non_blocking=True)
        if x.is_floating_point():
            return x
        if x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
        mean, std = self._on(x.device)
        return x.float().div_(255).sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std})"
