"""Fused forget/retain embedding-distance loss in Triton.

Shapes: student, retain, forget (rows, cols) with unit column stride; is_forget (rows,) uint8;
grad (rows, cols) contiguous in the student's dtype. The algebra is csrc/common/unlearn_loss.h:
the forward writes grad = c * norm * 2 (s - t) / cols = d loss / d student, and backward multiplies
by (grad_loss * w + grad_set) / c, skipped on the device when that is exactly 1.
"""
import torch
import triton
import triton.language as tl

from .launch import on_inputs_device

# A program covers CHUNK = BLOCK * STEPS columns of one row. BLOCK = 2048 with 8 warps is 8
# elements (16 bytes of bf16) per thread per step; 4 steps keep ~64 KiB in flight per program.
BLOCK = 2048
STEPS = 4
NUM_WARPS = 8
# Above this many rows, each program re-reading is_forget costs more than one extra launch.
INLINE_COUNT_MAX_ROWS = 4096
COUNT_BLOCK = 1024
FINALIZE_BLOCK = 1024


@triton.jit
def _set_norm(normalize_set: tl.constexpr, rows_in_set, batch):
    if normalize_set:
        return 1.0 / tl.maximum(rows_in_set, 1).to(tl.float32)
    else:
        return 2.0 / (batch * 1.0)  # not .to(): Triton passes an int argument equal to 1 as a constant


@triton.jit
def _grad_weight(w):
    return tl.where(w != 0.0, w, 1.0)


@triton.jit
def _count_forget(is_forget_ptr, rows, COUNT_BLOCK: tl.constexpr):
    n = tl.zeros([COUNT_BLOCK], dtype=tl.int32)
    for start in range(0, rows, COUNT_BLOCK):
        offs = start + tl.arange(0, COUNT_BLOCK)
        n += (tl.load(is_forget_ptr + offs, mask=offs < rows, other=0) != 0).to(tl.int32)
    return tl.sum(n, axis=0)


@triton.jit
def count_kernel(is_forget_ptr, count_ptr, rows, COUNT_BLOCK: tl.constexpr):
    tl.store(count_ptr, _count_forget(is_forget_ptr, rows, COUNT_BLOCK))


@triton.jit
def forward_kernel(
    student_ptr, retain_ptr, forget_ptr, is_forget_ptr, grad_ptr, partial_ptr, count_ptr,
    rows, cols, student_stride, retain_stride, forget_stride, chunks,
    retain_weight, forget_weight,
    NORMALIZE_SET: tl.constexpr, WRITE_GRAD: tl.constexpr, INLINE_COUNT: tl.constexpr,
    BLOCK: tl.constexpr, STEPS: tl.constexpr, COUNT_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // chunks).to(tl.int64)
    begin = (pid % chunks).to(tl.int64) * (BLOCK * STEPS)
    flag = tl.load(is_forget_ptr + row)
    forget = flag != 0
    is_retain = flag == 0
    s_row = student_ptr + row * student_stride
    # Each row reads only its own target: the other target's load is predicated off.
    r_row = retain_ptr + row * retain_stride
    f_row = forget_ptr + row * forget_stride
    coef = 0.0
    if WRITE_GRAD:
        if INLINE_COUNT:
            n_forget = _count_forget(is_forget_ptr, rows, COUNT_BLOCK)
        else:
            n_forget = tl.load(count_ptr)
        n_set = tl.where(forget, n_forget, rows - n_forget)
        w = tl.where(forget, forget_weight, retain_weight)
        coef = _grad_weight(w) * _set_norm(NORMALIZE_SET, n_set, rows) * 2.0 / (cols * 1.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        offs = begin + step * BLOCK + tl.arange(0, BLOCK)
        m = offs < cols
        s = tl.load(s_row + offs, mask=m, other=0.0).to(tl.float32)
        t_f = tl.load(f_row + offs, mask=m & forget, other=0.0).to(tl.float32)
        t_r = tl.load(r_row + offs, mask=m & is_retain, other=0.0).to(tl.float32)
        d = s - (t_f + t_r)
        acc += d * d
        if WRITE_GRAD:
            tl.store(grad_ptr + row * cols + offs, (coef * d).to(grad_ptr.dtype.element_ty), mask=m)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def finalize_kernel(
    partial_ptr, is_forget_ptr, loss_ptr, retain_loss_ptr, forget_loss_ptr,
    rows, cols, chunks, retain_weight, forget_weight,
    NORMALIZE_SET: tl.constexpr, BLOCK: tl.constexpr,
):
    sum_retain = tl.zeros([BLOCK], dtype=tl.float32)
    sum_forget = tl.zeros([BLOCK], dtype=tl.float32)
    n_forget = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, rows, BLOCK):
        r = start + tl.arange(0, BLOCK)
        m = r < rows
        row_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, chunks):
            row_sum += tl.load(partial_ptr + r.to(tl.int64) * chunks + c, mask=m, other=0.0)
        forget = tl.load(is_forget_ptr + r, mask=m, other=0) != 0
        sum_forget += tl.where(forget, row_sum, 0.0)
        sum_retain += tl.where(forget, 0.0, row_sum)
        n_forget += forget.to(tl.int32)
    nf = tl.sum(n_forget, axis=0)
    retain_loss = tl.sum(sum_retain, axis=0) / (cols * 1.0) * _set_norm(NORMALIZE_SET, rows - nf, rows)
    forget_loss = tl.sum(sum_forget, axis=0) / (cols * 1.0) * _set_norm(NORMALIZE_SET, nf, rows)
    tl.store(retain_loss_ptr, retain_loss)
    tl.store(forget_loss_ptr, forget_loss)
    tl.store(loss_ptr, retain_weight * retain_loss + forget_weight * forget_loss)


@triton.jit
def scale_kernel(
    grad_ptr, is_forget_ptr, grad_loss_ptr, grad_retain_ptr, grad_forget_ptr,
    cols, chunks, retain_weight, forget_weight,
    HAS_GRAD_LOSS: tl.constexpr, HAS_GRAD_RETAIN: tl.constexpr, HAS_GRAD_FORGET: tl.constexpr,
    BLOCK: tl.constexpr, STEPS: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // chunks).to(tl.int64)
    begin = (pid % chunks).to(tl.int64) * (BLOCK * STEPS)
    forget = tl.load(is_forget_ptr + row) != 0
    zero = tl.zeros([], dtype=tl.float32)
    g_loss = tl.load(grad_loss_ptr) if HAS_GRAD_LOSS else zero
    g_retain = tl.load(grad_retain_ptr) if HAS_GRAD_RETAIN else zero
    g_forget = tl.load(grad_forget_ptr) if HAS_GRAD_FORGET else zero
    w = tl.where(forget, forget_weight, retain_weight)
    scale = (g_loss * w + tl.where(forget, g_forget, g_retain)) / _grad_weight(w)
    # A scale of exactly 1 (loss.backward()) gives the row no columns to touch: every access is
    # predicated off, no memory traffic.
    limit = tl.where(scale != 1.0, cols, 0)
    for step in range(STEPS):
        offs = begin + step * BLOCK + tl.arange(0, BLOCK)
        m = offs < limit
        ptr = grad_ptr + row * cols + offs
        g = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        tl.store(ptr, (g * scale).to(grad_ptr.dtype.element_ty), mask=m)


def chunks_per_row(cols: int) -> int:
    return triton.cdiv(cols, BLOCK * STEPS)


@on_inputs_device
def forward(student, retain, forget, is_forget, retain_weight, forget_weight, normalize_set, compute_grad):
    """(loss, retain_loss, forget_loss, grad) of (rows, cols) inputs; grad is empty without compute_grad."""
    rows, cols = student.shape
    chunks = chunks_per_row(cols)
    f32 = dict(dtype=torch.float32, device=student.device)
    grad = torch.empty((rows, cols) if compute_grad else (0,), dtype=student.dtype, device=student.device)
    partial = torch.empty(rows * chunks, **f32)
    count = torch.empty(1, dtype=torch.int32, device=student.device)
    inline_count = rows <= INLINE_COUNT_MAX_ROWS
    if compute_grad and not inline_count:
        count_kernel[(1,)](is_forget, count, rows, COUNT_BLOCK=COUNT_BLOCK)
    forward_kernel[(rows * chunks,)](
        student, retain, forget, is_forget, grad, partial, count,
        rows, cols, student.stride(0), retain.stride(0), forget.stride(0), chunks,
        retain_weight, forget_weight,
        NORMALIZE_SET=normalize_set, WRITE_GRAD=compute_grad, INLINE_COUNT=inline_count,
        BLOCK=BLOCK, STEPS=STEPS, COUNT_BLOCK=COUNT_BLOCK, num_warps=NUM_WARPS,
    )
    loss, retain_loss, forget_loss = (torch.empty((), **f32) for _ in range(3))
    finalize_kernel[(1,)](
        partial, is_forget, loss, retain_loss, forget_loss, rows, cols, chunks, retain_weight, forget_weight,
        NORMALIZE_SET=normalize_set, BLOCK=FINALIZE_BLOCK, num_warps=4,
    )
    return loss, retain_loss, forget_loss, grad


@on_inputs_device
def scale_grad_(grad, is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight):
    """grad (rows, cols) *= each row's backward scale, in place; None grads count as 0."""
    rows, cols = grad.shape
    chunks = chunks_per_row(cols)
    scale_kernel[(rows * chunks,)](
        grad, is_forget, grad_loss if grad_loss is not None else grad,
        grad_retain if grad_retain is not None else grad, grad_forget if grad_forget is not None else grad,
        cols, chunks, retain_weight, forget_weight,
        HAS_GRAD_LOSS=grad_loss is not None, HAS_GRAD_RETAIN=grad_retain is not None,
        HAS_GRAD_FORGET=grad_forget is not None, BLOCK=BLOCK, STEPS=STEPS, num_warps=NUM_WARPS,
    )


def aot_variants():
    """(kernel, signature, constexprs, aligned int args, num_warps) of every variant the launchers
    can produce, for ahead-of-time compilation checks (kernels/aot.py)."""
    ints = dict(rows="i32", cols="i32", student_stride="i32", retain_stride="i32", forget_stride="i32", chunks="i32")
    floats = dict(retain_weight="fp32", forget_weight="fp32")
    for s_ty, t_ty in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")):
        ptrs = dict(student_ptr=f"*{s_ty}", retain_ptr=f"*{t_ty}", forget_ptr=f"*{t_ty}", is_forget_ptr="*u8",
                    grad_ptr=f"*{s_ty}", partial_ptr="*fp32", count_ptr="*i32")
        for normalize_set in (True, False):
            for write_grad, inline_count in ((True, True), (True, False), (False, True)):
                yield forward_kernel, {**ptrs, **ints, **floats}, dict(
                    NORMALIZE_SET=normalize_set, WRITE_GRAD=write_grad, INLINE_COUNT=inline_count,
                    BLOCK=BLOCK, STEPS=STEPS, COUNT_BLOCK=COUNT_BLOCK), ("cols", "student_stride"), NUM_WARPS
        for has in ((True, True, True), (True, False, False)):
            yield scale_kernel, dict(grad_ptr=f"*{s_ty}", is_forget_ptr="*u8", grad_loss_ptr="*fp32",
                                     grad_retain_ptr="*fp32", grad_forget_ptr="*fp32", cols="i32", chunks="i32",
                                     **floats), dict(
                HAS_GRAD_LOSS=has[0], HAS_GRAD_RETAIN=has[1], HAS_GRAD_FORGET=has[2], BLOCK=BLOCK,
                STEPS=STEPS), ("cols",), NUM_WARPS
    for normalize_set in (True, False):
        yield finalize_kernel, dict(partial_ptr="*fp32", is_forget_ptr="*u8", loss_ptr="*fp32",
                                    retain_loss_ptr="*fp32", forget_loss_ptr="*fp32", rows="i32", cols="i32",
                                    chunks="i32", **floats), dict(
            NORMALIZE_SET=normalize_set, BLOCK=FINALIZE_BLOCK), (), 4
    # Triton passes an int argument equal to 1 as a constant (batch 1, one element per row).
    ptrs = dict(student_ptr="*fp32", retain_ptr="*fp32", forget_ptr="*fp32", is_forget_ptr="*u8", grad_ptr="*fp32",
                partial_ptr="*fp32", count_ptr="*i32")
    for one in ("rows", "cols"):
        others = {k: v for k, v in ints.items() if k != one}
        for normalize_set in (True, False):
            yield forward_kernel, {**ptrs, **others, **floats}, {one: 1, **dict(
                NORMALIZE_SET=normalize_set, WRITE_GRAD=True, INLINE_COUNT=True, BLOCK=BLOCK, STEPS=STEPS,
                COUNT_BLOCK=COUNT_BLOCK)}, (), NUM_WARPS
            yield finalize_kernel, {**dict(partial_ptr="*fp32", is_forget_ptr="*u8", loss_ptr="*fp32",
                                           retain_loss_ptr="*fp32", forget_loss_ptr="*fp32", chunks="i32"),
                                    **{k: "i32" for k in ("rows", "cols") if k != one}, **floats}, {
                one: 1, "NORMALIZE_SET": normalize_set, "BLOCK": FINALIZE_BLOCK}, (), 4
    yield count_kernel, dict(is_forget_ptr="*u8", count_ptr="*i32", rows="i32"), dict(COUNT_BLOCK=COUNT_BLOCK), (), 4
