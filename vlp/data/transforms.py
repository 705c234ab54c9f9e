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
from collections.abc import Sequence

import torch

CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the random resized crop (torchvision's and open_clip's)


def draft_min_side(size: int, crop_scale: Sequence[float]) -> int:
    """The short side a training image must keep when decoded at reduced scale, in pixels, so
    that every random resized crop of ``crop_scale`` still covers >= ``size`` pixels per side
    (see the module docstring); 0 (never reduce) when crops may be arbitrarily small."""
    smallest = min(crop_scale[0], 1.0) * min(CROP_RATIO[0], 1 / CROP_RATIO[1])
    return math.ceil(size / math.sqrt(smallest)) if smallest > 0 else 0


def _rgb(image):
    return image if image.mode == "RGB" else image.convert("RGB")


def train_transform(size: int, crop_scale: Sequence[float] = (0.9, 1.0)):
    """PIL image -> uint8 tensor 3xSxS: random resized crop of ``crop_scale`` area, bicubic.

    The crop draws the same random numbers and computes the same pixels as open_clip's training
    transform (``open_clip.image_transform(S, is_train=True, aug_cfg={"scale": ...})``);
    ``DeviceNormalize`` of the result equals open_clip's float output exactly.
    """
    from torchvision.transforms import Compose, InterpolationMode, PILToTensor, RandomResizedCrop

    crop = RandomResizedCrop(size, scale=tuple(crop_scale), ratio=CROP_RATIO, interpolation=InterpolationMode.BICUBIC)
    return Compose([crop, _rgb, PILToTensor()])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]):
    """PIL image -> float tensor 3xSxS: resize the short side to S, centre crop, normalise."""
    import open_clip

    return open_clip.image_transform(size, is_train=False, mean=mean, std=std)


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
