"""The reference's training augmentation, batched on the data's device.

The reference code (main_unlearn.py, as MAE's main_pretrain.py) reads each image through
torchvision's RandomResizedCrop(size, scale=(0.2, 1.0), bicubic) and RandomHorizontalFlip. Here
the images are decoded once, held at SOURCE_SCALE times the model's side, and each step crops,
flips and resizes its whole batch in one affine grid_sample, with parameters drawn from the step's
generator: the same for any number of ranks (each takes its rows of the global batch's draws),
exact on resume, and no data-loader workers.

Kept from torchvision: the area fraction uniform in `scale`, the log aspect ratio uniform in
`ratio`, up to TRIES draws for a crop that fits and the whole image when none does, offsets uniform
over where the crop fits, a flip one time in two. Changed: crops come from the square copy held
in memory (a non-square photo's aspect squashed first, a small crop enlarged from 8/7 of the
model's side rather than from the full-size file); positions and sizes are continuous rather than
whole pixels; the bicubic resize does not antialias (at most an 8/7 reduction).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

AUGMENTS = ("none", "crop-flip")
SOURCE_SCALE = 8 / 7  # crops are taken from images held at 8/7 of the model's side (256 for 224)
SCALE, RATIO, TRIES = (0.2, 1.0), (3 / 4, 4 / 3), 10
DRAWS = 2 * TRIES + 3  # uniforms per image: (area, aspect) per try, then x, y, flip


def source_size(size: int, augment: str) -> int:
    """The side to hold images at for `augment` of size x size inputs."""
    return round(size * SOURCE_SCALE) if augment == "crop-flip" else size


def crop_flip_params(uniforms: Tensor) -> Tensor:
    """(rows, DRAWS) uniforms in [0, 1) -> (rows, 5): crop width and height as fractions of the
    source's, left and top offsets as fractions, and 1.0 where the crop is mirrored."""
    area = SCALE[0] + (SCALE[1] - SCALE[0]) * uniforms[:, :TRIES]
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniforms[:, TRIES:2 * TRIES])
    width, height = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (width <= 1) & (height <= 1)
    first = fits.to(torch.int32).argmax(1, keepdim=True)  # the first try that fits (0 when none)
    any_fit = fits.any(1)
    one = torch.ones_like(any_fit, dtype=width.dtype)
    width = torch.where(any_fit, width.gather(1, first)[:, 0], one)  # none fits: the whole image
    height = torch.where(any_fit, height.gather(1, first)[:, 0], one)
    left = uniforms[:, 2 * TRIES] * (1 - width)
    top = uniforms[:, 2 * TRIES + 1] * (1 - height)
    flip = (uniforms[:, 2 * TRIES + 2] < 0.5).to(width.dtype)
    return torch.stack([width, height, left, top, flip], 1)


def crop_flip(images: Tensor, size: int, params: Tensor) -> Tensor:
    """Each image's crop (params from crop_flip_params), mirrored where asked, resized bicubically
    to size x size, clamped to [0, 1] (as the uint8 pixels of torchvision's PIL path are)."""
    width, height, left, top, flip = params.to(torch.float32).unbind(1)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device)
    # align_corners=False: the output's edges [-1, 1] map onto the crop's edges
    theta[:, 0, 0] = width * (1 - 2 * flip)
    theta[:, 0, 2] = 2 * left + width - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2 * top + height - 1
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)
