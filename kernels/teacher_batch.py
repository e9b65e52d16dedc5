"""The teacher batch in Triton: retain rows copied, forget rows replaced by noise, then clamped.

Shapes: images and out (rows, row_numel) contiguous; is_forget (rows,) uint8; stream two int64 on
the device: the Philox seed and the flat index of the first element. The noise is fastforget's
Philox stream (csrc/common/philox.h): the same uniform bits as the CPU and CUDA backends, and
normal draws equal to theirs within a few ulp (each backend has its own log and cos).
"""
import torch
import triton
import triton.language as tl

from .launch import on_inputs_device

NORMAL, UNIFORM, CONSTANT = 0, 1, 2
STATS_BLOCK = 4096  # elements per statistics program, two passes over registers
MERGE_BLOCK = 1024
OUT_BLOCK = 1024  # elements per output step; a program covers OUT_STEPS of them in one row
OUT_STEPS = 4
NUM_WARPS = 4


@triton.jit
def _philox(counter, seed):
    """Philox4x32-10 of a uint64 counter block under a uint64 seed: four uint32 blocks."""
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi2 = tl.umulhi(c2, 0xCD9E8D57)
        lo2 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _uniform(bits):
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-8


@triton.jit
def _noise(i, seed, mean, std, lo, hi, NOISE: tl.constexpr):
    """The value of forget-row element i (int64 flat index) before clamping."""
    if NOISE == 0:
        r0, r1, r2, r3 = _philox((i >> 1).to(tl.uint64), seed)
        odd = (i & 1) == 1
        a = tl.where(odd, r2, r0)
        b = tl.where(odd, r3, r1)
        u1 = ((a >> 8) + 1).to(tl.float32) * 5.9604644775390625e-8
        u2 = _uniform(b)
        # sqrt_rn: IEEE sqrt, as the other backends (tl.sqrt compiles to sqrt.approx)
        return tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2) * std + mean
    elif NOISE == 1:
        r0, r1, r2, r3 = _philox((i >> 2).to(tl.uint64), seed)
        lane = i & 3
        bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
        return lo + _uniform(bits) * (hi - lo)
    else:
        return tl.zeros(i.shape, dtype=tl.float32) + mean


@triton.jit
def moments_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    n = tl.sum(m.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / n
    d = tl.where(m, x - mean, 0.0)
    tl.store(count_ptr + pid, n)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, tl.sum(d * d, axis=0))


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Chan et al.'s pairwise merge (csrc/common/teacher_batch.h); empty sides contribute nothing.
    n = n_a + n_b
    delta = mean_b - mean_a
    safe = tl.where(n > 0, n, 1.0)
    return n, mean_a + delta * n_b / safe, m2_a + m2_b + delta * delta * n_a * n_b / safe


@triton.jit
def merge_kernel(count_ptr, mean_ptr, m2_ptr, parts, mean_std_ptr, BLOCK: tl.constexpr):
    # Lane j merges parts j, j + BLOCK, ... in order; then a fixed tree over lanes. In float64.
    acc_n = tl.zeros([BLOCK], dtype=tl.float64)
    acc_mean = tl.zeros([BLOCK], dtype=tl.float64)
    acc_m2 = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < parts
        n = tl.load(count_ptr + offs, mask=m, other=0.0).to(tl.float64)
        mean = tl.load(mean_ptr + offs, mask=m, other=0.0).to(tl.float64)
        m2 = tl.load(m2_ptr + offs, mask=m, other=0.0).to(tl.float64)
        acc_n, acc_mean, acc_m2 = _merge(acc_n, acc_mean, acc_m2, n, mean, m2)
    n, mean, m2 = tl.reduce((acc_n, acc_mean, acc_m2), 0, _merge)
    tl.store(mean_std_ptr, mean.to(tl.float32))
    tl.store(mean_std_ptr + 1, tl.sqrt(m2 / (n - 1.0)).to(tl.float32))  # unbiased, as torch.std


@triton.jit
def output_kernel(x_ptr, out_ptr, is_forget_ptr, stream_ptr, mean_std_ptr, row_numel, chunks_per_row, lo, hi,
                  NOISE: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // chunks_per_row).to(tl.int64)
    row_begin = row * row_numel
    begin = (pid % chunks_per_row).to(tl.int64) * (BLOCK * STEPS)
    forget = tl.load(is_forget_ptr + row) != 0
    if forget:
        seed = tl.load(stream_ptr).to(tl.uint64)
        first = tl.load(stream_ptr + 1)
        mean = 0.0
        std = 0.0
        if NOISE != 1:
            mean = tl.load(mean_std_ptr)
            std = tl.load(mean_std_ptr + 1)
        for step in range(STEPS):
            offs = begin + step * BLOCK + tl.arange(0, BLOCK)
            m = offs < row_numel
            v = _noise(first + row_begin + offs, seed, mean, std, lo, hi, NOISE)
            if CLAMP:
                v = tl.where(v < lo, lo, tl.where(v > hi, hi, v))  # NaN stays NaN, as torch.clamp
            tl.store(out_ptr + row_begin + offs, v.to(out_ptr.dtype.element_ty), mask=m)
    else:  # retain rows: bit for bit
        for step in range(STEPS):
            offs = begin + step * BLOCK + tl.arange(0, BLOCK)
            m = offs < row_numel
            tl.store(out_ptr + row_begin + offs, tl.load(x_ptr + row_begin + offs, mask=m), mask=m)


@on_inputs_device
def make_teacher_batch(images, is_forget, stream, noise: int, clamp_lo, clamp_hi):
    """(rows, ...) contiguous images -> the teacher batch; noise 0 normal, 1 uniform, 2 constant."""
    rows = images.shape[0]
    numel = images.numel()
    row_numel = numel // rows
    out = torch.empty_like(images)
    mean_std = torch.zeros(2, dtype=torch.float32, device=images.device)
    if noise != UNIFORM:
        parts = triton.cdiv(numel, STATS_BLOCK)
        count, mean, m2 = (torch.empty(parts, dtype=torch.float32, device=images.device) for _ in range(3))
        moments_kernel[(parts,)](images, count, mean, m2, numel, BLOCK=STATS_BLOCK, num_warps=8)
        merge_kernel[(1,)](count, mean, m2, parts, mean_std, BLOCK=MERGE_BLOCK, num_warps=4)
    clamp = clamp_lo is not None
    lo, hi = (clamp_lo, clamp_hi) if clamp else (0.0, 1.0)
    chunks_per_row = triton.cdiv(row_numel, OUT_BLOCK * OUT_STEPS)
    output_kernel[(rows * chunks_per_row,)](
        images, out, is_forget, stream, mean_std, row_numel, chunks_per_row, lo, hi,
        NOISE=noise, CLAMP=clamp, BLOCK=OUT_BLOCK, STEPS=OUT_STEPS, num_warps=NUM_WARPS,
    )
    return out


def aot_variants():
    """As kernels/unlearn_loss.py's: every variant the launcher can produce."""
    for ty in ("fp32", "bf16", "fp16"):
        yield moments_kernel, dict(x_ptr=f"*{ty}", count_ptr="*fp32", mean_ptr="*fp32", m2_ptr="*fp32",
                                   numel="i32"), dict(BLOCK=STATS_BLOCK), ("numel",), 8
        for noise in (NORMAL, UNIFORM, CONSTANT):
            for clamp in (True, False):
                yield output_kernel, dict(x_ptr=f"*{ty}", out_ptr=f"*{ty}", is_forget_ptr="*u8", stream_ptr="*i64",
                                          mean_std_ptr="*fp32", row_numel="i32", chunks_per_row="i32",
                                          lo="fp32", hi="fp32"), dict(
                    NOISE=noise, CLAMP=clamp, BLOCK=OUT_BLOCK, STEPS=OUT_STEPS), ("row_numel",), NUM_WARPS
    yield merge_kernel, dict(count_ptr="*fp32", mean_ptr="*fp32", m2_ptr="*fp32", parts="i32",
                             mean_std_ptr="*fp32"), dict(BLOCK=MERGE_BLOCK), (), 4
