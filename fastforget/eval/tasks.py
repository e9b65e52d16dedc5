"""The reference code's image-to-image tasks for MAE: inpainting and outpainting.

inpaint removes a centre square of patches (side = ratio of the grid); outpaint removes the
border and keeps that centre. The model reconstructs the removed patches; the output keeps the
given pixels and takes the rest from the model.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InvalidValue

TASKS = ("inpaint", "outpaint")


def removed_patches(model, task: str, ratio: float = 0.5) -> Tensor:
    """(L,) bool, True for the patches the task removes, in the model's patch order."""
    if task not in TASKS:
        raise InvalidValue(f"task must be one of {TASKS}, got {task!r}")
    if not 0 < ratio < 1:
        raise InvalidValue(f"ratio must be in (0, 1), got {ratio!r}")
    grid_h, grid_w = model.patch_embed.grid_size
    side_h, side_w = max(1, round(grid_h * ratio)), max(1, round(grid_w * ratio))
    centre = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    top, left = (grid_h - side_h) // 2, (grid_w - side_w) // 2
    centre[top:top + side_h, left:left + side_w] = True
    return (centre if task == "inpaint" else ~centre).reshape(-1)


@torch.no_grad()
def complete(model, images: Tensor, removed: Tensor) -> tuple[Tensor, Tensor]:
    """(output images, removed-pixel map (1, 1, H, W)): given pixels kept, the rest reconstructed."""
    batch = images.shape[0]
    order = torch.cat([(~removed).nonzero()[:, 0], removed.nonzero()[:, 0]]).to(images.device)
    ids_keep = order[: int((~removed).sum())].expand(batch, -1).contiguous()
    ids_restore = torch.argsort(order).expand(batch, -1)
    pred = model.forward_decoder(model.encode(images, ids_keep), ids_restore)
    recon = model.reconstruct(pred).clamp(0, 1)
    per_patch = removed.to(images.dtype)[None, :, None].expand(1, -1, model.patchify(images[:1]).shape[-1])
    region = model.unpatchify(per_patch)[:, :1]
    return images * (1 - region) + recon * region, region
