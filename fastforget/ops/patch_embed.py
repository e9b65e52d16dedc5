"""MAE's random masking and the masked-patch encoding.

masked_patch_embed reads and embeds only the kept patches (a quarter of MAE's work at mask ratio
0.75) and adds bias, position and cls in the GEMM's epilogue. Its gradients (weight, bias,
pos_embed, cls_token) come from the kept patches alone; the position gradient is a GEMM with the
one-hot matrix of the kept ids, deterministic on every device. Images get no gradient from the
fast backends: when they require one, dispatch falls back to the reference (MAE's convolution).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidType, InvalidValue
from . import backends, custom, reference
from .unlearn_loss import FLOAT_DTYPES


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, *, noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None, device=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(ids_keep, ids_restore, mask) exactly as MAE's random_masking.

    Keeps K = int(num_patches * (1 - mask_ratio)) patches per row: ids_keep (B, K) int64,
    ids_restore (B, L) int64, mask (B, L) float32 with 0 = kept, 1 = removed, in patch order.
    noise (B, L) reproduces MAE's masks (ids_shuffle = argsort(noise)); otherwise it is uniform,
    drawn from generator on device.
    """
    for name, v in (("batch_size", batch_size), ("num_patches", num_patches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidValue(f"{name} must be a positive int, got {v!r}")
    if not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
        raise InvalidValue(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    if int(num_patches * (1 - mask_ratio)) < 1:
        raise InvalidValue(f"mask_ratio {mask_ratio} keeps no patch of {num_patches}; lower it")
    if noise is None:
        noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    elif not isinstance(noise, Tensor) or noise.shape != (batch_size, num_patches) or not noise.dtype.is_floating_point:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise InvalidValue(f"noise must be a float tensor of shape ({batch_size}, {num_patches}), got {got}")
    keep = int(num_patches * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    # The inverse permutation by a scatter, where MAE sorts a second time: the same ids, O(L).
    positions = torch.arange(num_patches, device=noise.device).expand(batch_size, -1)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    mask = (ids_restore >= keep).float()  # removed: a place past the kept ones in the shuffle
    return ids_shuffle[:, :keep], ids_restore, mask


def masked_patch_embed(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor, ids_keep: Tensor,
    cls_token: Optional[Tensor] = None, *, backend: Optional[str] = None,
) -> Tensor:
    """(B, K, D), or (B, 1 + K, D) with cls_token: MAE's patch embedding of the kept patches.

    Equal to conv2d(images, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed[:, 1:],
    gathered at ids_keep, with cls_token + pos_embed[:, :1] in front when given. images (B, C, H, W)
    with H, W multiples of p; weight (D, C, p, p) (timm's PatchEmbed.proj.weight); bias (D,) or
    None; pos_embed (1, 1 + L, D), the cls position first; ids_keep (B, K) int64 in [0, L);
    cls_token (1, 1, D) or None. The output has weight's dtype.
    """
    _check(images, weight, bias, pos_embed, ids_keep, cls_token)
    requested = backends.requested_backend(backend)
    if torch.is_grad_enabled() and images.requires_grad:
        why = ["images require grad; the fast kernels give no image gradient (the reference does)"]
        backends.select("masked_patch_embed", requested, images.device, lambda n: [] if n == "torch" else why)
        return reference.masked_patch_embed(images, weight, bias, pos_embed, ids_keep, cls_token)
    args = (images, weight, bias, pos_embed, ids_keep, cls_token)
    if custom.traced():
        return PATCH_EMBED.op(*args, requested)
    name = backends.select("masked_patch_embed", requested, images.device)
    if name in backends.native.EXTENSIONS:  # autograd in C++
        return backends.native.ops(name).masked_patch_embed_autograd(*args)
    return PATCH_EMBED.eager(*args, name)


def _check(images, weight, bias, pos_embed, ids_keep, cls_token) -> None:
    arguments = (("images", images), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed),
                 ("ids_keep", ids_keep), ("cls_token", cls_token))
    for name, t in arguments:
        if not isinstance(t, Tensor) and not (t is None and name in ("bias", "cls_token")):
            optional = " or None" if name in ("bias", "cls_token") else ""
            raise InvalidType(f"{name} must be a torch.Tensor{optional}, got {type(t).__name__}")
    device = images.device
    for name, t in arguments[1:]:
        if t is not None and t.device != device:
            raise InvalidValue(f"{name} must be on images' device {device}, got {t.device}")
    if images.dim() != 4 or images.dtype not in FLOAT_DTYPES or images.shape[0] == 0:
        raise InvalidValue(f"images must be (B, C, H, W) float32, bfloat16 or float16 with B >= 1, "
                         f"got {tuple(images.shape)} {images.dtype}")
    if (weight.dim() != 4 or weight.shape[1] != images.shape[1] or weight.shape[2] != weight.shape[3]
            or weight.shape[0] == 0 or weight.shape[2] == 0):
        raise InvalidValue(f"weight must be (D, C, p, p) with D, p >= 1 and C = {images.shape[1]} (images' channels), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise InvalidType(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    dim, patch = weight.shape[0], weight.shape[-1]
    height, width = images.shape[-2:]
    if height % patch or width % patch:
        raise InvalidValue(f"images' height and width must be multiples of the patch size {patch}, got {height}x{width}")
    length = (height // patch) * (width // patch)
    for name, t, shape in (("bias", bias, (dim,)), ("pos_embed", pos_embed, (1, 1 + length, dim)),
                           ("cls_token", cls_token, (1, 1, dim))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise InvalidValue(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != weight.dtype:
            raise InvalidType(f"{name} must have weight's dtype {weight.dtype}, got {t.dtype}")
    if ids_keep.dtype != torch.int64 or ids_keep.dim() != 2 or ids_keep.shape[0] != images.shape[0] or ids_keep.shape[1] < 1:
        raise InvalidValue(f"ids_keep must be int64 (B={images.shape[0]}, K >= 1), got {tuple(ids_keep.shape)} {ids_keep.dtype}")
    if ids_keep.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(ids_keep))
        if low < 0 or high >= length:
            raise InvalidValue(f"ids_keep must lie in [0, {length}) (patches per image), got values "
                               f"from {low} to {high}")
    else:  # checked where the data lives, without a host synchronisation (and traceable); on CUDA a
        # failure is a device-side assert, which leaves the CUDA context unusable, as indexing errors do
        torch._assert_async(((ids_keep >= 0) & (ids_keep < length)).all(),
                            f"ids_keep must lie in [0, {length}) (patches per image)")


def _gather_patches(images: Tensor, ids_keep: Tensor, patch: int) -> Tensor:
    """(B, K, C p p): the kept patches in Conv2d's (c, i, j) order, read from a strided view."""
    batch, channels, height, width = images.shape
    grid_w = width // patch
    cells = images.unflatten(2, (height // patch, patch)).unflatten(4, (grid_w, patch)).permute(0, 2, 4, 1, 3, 5)
    rows = torch.arange(batch, device=images.device)[:, None]
    return cells[rows, ids_keep // grid_w, ids_keep % grid_w].reshape(batch, ids_keep.shape[1], -1)


def _torch_impl(images, weight, bias, pos_embed, ids_keep, cls_token):
    dim = weight.shape[0]
    patches = _gather_patches(images, ids_keep, weight.shape[-1]).to(weight.dtype)
    x = patches @ weight.reshape(dim, -1).t() + pos_embed[0, 1:][ids_keep]
    if bias is not None:
        x = x + bias
    if cls_token is not None:
        x = torch.cat([(cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
    return x


def _forward(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor, ids_keep: Tensor,
             cls_token: Optional[Tensor], backend: str) -> Tensor:
    name = backends.select("masked_patch_embed", backend, images.device)
    if name == "torch":
        return _torch_impl(images, weight, bias, pos_embed, ids_keep, cls_token)
    # The kernels take dense row-major tensors: copies only where the caller's are not.
    images, weight, pos_embed, ids_keep = (t.contiguous() for t in (images, weight, pos_embed, ids_keep))
    bias, cls_token = (None if t is None else t.contiguous() for t in (bias, cls_token))
    if name == "triton":
        from ..kernels import patch_embed as kernel

        return kernel.masked_patch_embed(images, weight, bias, pos_embed, ids_keep, cls_token)
    return backends.native.ops(name).masked_patch_embed(images, weight, bias, pos_embed, ids_keep, cls_token)


def _forward_fake(images, weight, bias, pos_embed, ids_keep, cls_token, backend):
    tokens = ids_keep.shape[1] + (cls_token is not None)
    return images.new_empty((images.shape[0], tokens, weight.shape[0]), dtype=weight.dtype)


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, ids_keep, cls_token, _ = inputs
    ctx.save_for_backward(images, ids_keep)
    ctx.weight_shape, ctx.has_bias, ctx.has_cls = weight.shape, bias is not None, cls_token is not None
    ctx.length = pos_embed.shape[1] - 1


def _backward(ctx, grad):
    """Gradients of the parameters from the kept patches; float32 sums, then the parameters' dtype."""
    images, ids_keep = ctx.saved_tensors
    needs = ctx.needs_input_grad
    batch, keep = ids_keep.shape
    dim = ctx.weight_shape[0]
    g = grad[:, 1:] if ctx.has_cls else grad  # (B, K, D): the patch tokens
    d_weight = d_bias = d_pos = d_cls = None
    if needs[1]:
        patches = _gather_patches(images, ids_keep, ctx.weight_shape[-1]).to(grad.dtype)
        d_weight = (g.reshape(-1, dim).t() @ patches.reshape(batch * keep, -1)).view(ctx.weight_shape)
    if needs[2] and ctx.has_bias:
        d_bias = g.float().sum((0, 1)).to(grad.dtype)
    cls_sum = grad[:, 0].float().sum(0) if ctx.has_cls else None
    if needs[3]:
        # Position l's gradient: the sum over images of the token that kept patch l, as a GEMM
        # with the one-hot matrix of ids_keep (no scatter-add atomics): deterministic everywhere.
        one_hot = torch.nn.functional.one_hot(ids_keep.reshape(-1), ctx.length).to(grad.dtype)
        d_patches = (one_hot.t() @ g.reshape(-1, dim)).float()
        d_cls_pos = cls_sum if ctx.has_cls else torch.zeros(dim, device=grad.device)
        d_pos = torch.cat([d_cls_pos[None], d_patches])[None].to(grad.dtype)
    if needs[5] and ctx.has_cls:
        d_cls = cls_sum.view(1, 1, dim).to(grad.dtype)
    return None, d_weight, d_bias, d_pos, None, d_cls, None


PATCH_EMBED = custom.register("masked_patch_embed", _forward, _forward_fake, setup_context=_setup_context,
                              backward=_backward)
