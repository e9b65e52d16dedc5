"""GroupNorm, scale-shift and SiLU in Triton: one program per (image, group) pair.

x (B, C, S) contiguous, so a pair is one contiguous block of C/G channels of S positions.
Forward: the statistics in one read (sums of x - x[0], shifted so a large mean does not cancel
the variance away), then a second read writes y channel by channel, each channel's affine folded
into one multiply-add. Backward: one read of x and dy for the per-channel sums (the parameters'
gradients before the sum over images, and the group's two sums dx needs), a second for dx.
Statistics and sums are float32 whatever the dtype. The semantics are fastforget/ops/group_norm.py's.
"""
import itertools

import torch
import triton
import triton.language as tl

from .launch import on_inputs_device

STATS_BLOCK = 2048


def _block(positions: int) -> int:
    """Lanes per channel step: the channel's positions, rounded to a power of two in [128, 1024]."""
    return min(1024, max(128, triton.next_power_of_2(positions)))


def _warps(block: int) -> int:
    """Four lanes a thread (16-byte float32 accesses)."""
    return block // 128


@triton.jit
def _channel(w_ptr, b_ptr, scale_ptr, shift_ptr, image, c, channels,
             HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(weight, bias, 1 + scale, shift) of channel c of this image, float32."""
    w = tl.load(w_ptr + c).to(tl.float32) if HAS_WEIGHT else 1.0
    b = tl.load(b_ptr + c).to(tl.float32) if HAS_BIAS else 0.0
    film = 1.0 + tl.load(scale_ptr + image * channels + c).to(tl.float32) if HAS_SCALE else 1.0
    sh = tl.load(shift_ptr + image * channels + c).to(tl.float32) if HAS_SHIFT else 0.0
    return w, b, film, sh


@triton.jit
def norm_forward_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr, channels, positions, groups,
                   eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    image = pair // groups
    per_group = channels // groups
    n = per_group * positions
    base = pair.to(tl.int64) * n
    pivot = tl.load(x_ptr + base).to(tl.float32)
    acc = tl.zeros([STATS], dtype=tl.float32)
    acc2 = tl.zeros([STATS], dtype=tl.float32)
    for start in range(0, n, STATS):
        offs = start + tl.arange(0, STATS)
        d = tl.where(offs < n, tl.load(x_ptr + base + offs, mask=offs < n, other=0.0).to(tl.float32) - pivot, 0.0)
        acc += d
        acc2 += d * d
    shift_mean = tl.sum(acc, axis=0) / n
    var = tl.maximum(tl.sum(acc2, axis=0) / n - shift_mean * shift_mean, 0.0)
    mean = pivot + shift_mean
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(mean_ptr + pair, mean)
    tl.store(rstd_ptr + pair, rstd)
    for k in range(0, per_group):
        c = (pair % groups) * per_group + k
        w, b, film, sh = _channel(w_ptr, b_ptr, scale_ptr, shift_ptr, image, c, channels,
                                  HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        mul = rstd * w * film
        add = b * film + sh
        row = base + k * positions
        for start in range(0, positions, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < positions
            z = (tl.load(x_ptr + row + offs, mask=m, other=0.0).to(tl.float32) - mean) * mul + add
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(y_ptr + row + offs, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dz(x, dy, mean, rstd, w, b, film, sh, SILU: tl.constexpr):
    """(x_hat, n = x_hat w + b, dz = dy act'(z)) in float32."""
    x_hat = (x - mean) * rstd
    nv = x_hat * w + b
    dz = dy
    if SILU:
        z = nv * film + sh
        sg = tl.sigmoid(z)
        dz = dy * sg * (1.0 + z * (1.0 - sg))
    return x_hat, nv, dz


@triton.jit
def norm_backward_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, dx_ptr, sums_ptr,
                    batch, channels, positions, groups, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """sums (4, B, C) float32: per (image, channel) dn x_hat, dn, dz n and dz (see GroupNormArgs)."""
    pair = tl.program_id(0)
    image = pair // groups
    per_group = channels // groups
    base = pair.to(tl.int64) * per_group * positions
    mean = tl.load(mean_ptr + pair)
    rstd = tl.load(rstd_ptr + pair)
    plane = batch * channels
    group_dn_w = 0.0
    group_dn_w_xhat = 0.0
    for k in range(0, per_group):  # pass 1: the per-channel and per-group sums
        c = (pair % groups) * per_group + k
        w, b, film, sh = _channel(w_ptr, b_ptr, scale_ptr, shift_ptr, image, c, channels,
                                  HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        row = base + k * positions
        s_dz = tl.zeros([BLOCK], dtype=tl.float32)
        s_dz_n = tl.zeros([BLOCK], dtype=tl.float32)
        s_dz_xhat = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, positions, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < positions
            x = tl.load(x_ptr + row + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row + offs, mask=m, other=0.0).to(tl.float32)
            x_hat, nv, dz = _dz(x, dy, mean, rstd, w, b, film, sh, SILU)
            s_dz += dz  # dy is 0 off the row, so dz is too
            s_dz_n += dz * nv
            s_dz_xhat += dz * x_hat
        dz_sum = tl.sum(s_dz, axis=0)
        dn_xhat = tl.sum(s_dz_xhat, axis=0) * film
        dn = dz_sum * film
        at = image * channels + c
        tl.store(sums_ptr + at, dn_xhat)
        tl.store(sums_ptr + plane + at, dn)
        tl.store(sums_ptr + 2 * plane + at, tl.sum(s_dz_n, axis=0))
        tl.store(sums_ptr + 3 * plane + at, dz_sum)
        group_dn_w += dn * w
        group_dn_w_xhat += dn_xhat * w
    inv_n = 1.0 / (per_group * positions)
    mean_dn_w = group_dn_w * inv_n
    mean_dn_w_xhat = group_dn_w_xhat * inv_n
    for k in range(0, per_group):  # pass 2: dx = rstd (dn w - mean(dn w) - x_hat mean(dn w x_hat))
        c = (pair % groups) * per_group + k
        w, b, film, sh = _channel(w_ptr, b_ptr, scale_ptr, shift_ptr, image, c, channels,
                                  HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        row = base + k * positions
        for start in range(0, positions, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < positions
            x = tl.load(x_ptr + row + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row + offs, mask=m, other=0.0).to(tl.float32)
            x_hat, nv, dz = _dz(x, dy, mean, rstd, w, b, film, sh, SILU)
            dx = (dz * film * w - mean_dn_w - x_hat * mean_dn_w_xhat) * rstd
            tl.store(dx_ptr + row + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _flags(weight, bias, scale, shift):
    return dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
                HAS_SHIFT=shift is not None)


def _pointers(x, weight, bias, scale, shift):
    """Absent parameters point at x: their loads are compiled out."""
    return [x if t is None else t for t in (weight, bias, scale, shift)]


@on_inputs_device
def forward(x, weight, bias, scale, shift, groups: int, eps: float, silu: bool):
    """Contiguous x (B, C, ...) -> (y, mean (B, G), rstd (B, G))."""
    batch, channels = x.shape[:2]
    positions = x.numel() // (batch * channels)
    block = _block(positions)
    y = torch.empty_like(x)
    mean = torch.empty(batch, groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    norm_forward_kernel[(batch * groups,)](x, *_pointers(x, weight, bias, scale, shift), y, mean, rstd, channels,
                                      positions, groups, eps, **_flags(weight, bias, scale, shift), SILU=silu,
                                      STATS=STATS_BLOCK, BLOCK=block, num_warps=_warps(block))
    return y, mean, rstd


@on_inputs_device
def backward(grad, x, weight, bias, scale, shift, mean, rstd, groups: int, silu: bool):
    """(dx, d weight, d bias, d scale, d shift), None for absent parameters."""
    batch, channels = x.shape[:2]
    positions = x.numel() // (batch * channels)
    block = _block(positions)
    dx = torch.empty_like(x)
    sums = torch.empty(4, batch, channels, dtype=torch.float32, device=x.device)
    norm_backward_kernel[(batch * groups,)](grad, x, *_pointers(x, weight, bias, scale, shift), mean, rstd, dx, sums,
                                       batch, channels, positions, groups, **_flags(weight, bias, scale, shift),
                                       SILU=silu, BLOCK=block, num_warps=_warps(block))
    # copies: the gradients must not share sums' storage (outputs of a custom op never alias)
    cast = lambda t, like: None if like is None else t.to(like.dtype, copy=True)  # noqa: E731
    return dx, cast(sums[0].sum(0), weight), cast(sums[1].sum(0), bias), cast(sums[2], scale), cast(sums[3], shift)


def aot_variants():
    """As kernels/unlearn_loss.py's: the variants a diffusion UNet's training produces (float32
    parameters, FiLM or not, SiLU or not), for every activation dtype and the shortest and
    longest channel steps."""
    params = dict(w_ptr="*fp32", b_ptr="*fp32", scale_ptr="*fp32", shift_ptr="*fp32")
    sizes = dict(channels="i32", positions="i32", groups="i32")
    for ty, film, silu, block in itertools.product(("fp32", "bf16", "fp16"), (True, False), (True, False), (128, 1024)):
        flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_SCALE=film, HAS_SHIFT=film, SILU=silu, BLOCK=block)
        yield norm_forward_kernel, dict(x_ptr=f"*{ty}", **params, y_ptr=f"*{ty}", mean_ptr="*fp32", rstd_ptr="*fp32",
                                        **sizes, eps="fp32"), dict(flags, STATS=STATS_BLOCK), ("positions",), \
            _warps(block)
        yield norm_backward_kernel, dict(dy_ptr=f"*{ty}", x_ptr=f"*{ty}", **params, mean_ptr="*fp32",
                                         rstd_ptr="*fp32", dx_ptr=f"*{ty}", sums_ptr="*fp32", batch="i32", **sizes), \
            flags, ("positions",), _warps(block)
