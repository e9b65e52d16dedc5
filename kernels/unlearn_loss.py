"""Fused forget/retain feature-distance loss in Triton, over a table of tensors.

Each tensor i of the table: student, retain, forget (rows, cols_i) with unit column stride, grad
(rows, cols_i) contiguous in the student's dtype; all share is_forget (rows,) uint8, one student
dtype and one target dtype. The table is an int64 tensor on the device, a row per tensor: its
pointers, strides, cols and first program (TABLE_* below); programs find their tensor by its
first program. The algebra is csrc/common/unlearn_loss.h: the forward writes grad = c * norm * 2
(s - t) / cols = d loss / d student, and backward multiplies by (grad_loss * w + grad_set) / c,
skipped on the device when that is exactly 1.
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
MAX_TENSORS = 32  # table rows at most (a power of two: programs search it as one vector)
# A table row: student, retain, forget and grad addresses; the three row strides; cols; the
# tensor's first program.
WIDTH = 9


@triton.jit
def _set_norm(NORMALIZE: tl.constexpr, rows_in_set, batch):
    if NORMALIZE == 0:  # set
        return 1.0 / tl.maximum(rows_in_set, 1).to(tl.float32)
    elif NORMALIZE == 1:  # reference
        return 2.0 / (batch * 1.0)  # not .to(): Triton passes an int argument equal to 1 as a constant
    else:  # batch
        return 1.0 / (batch * 1.0)


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
def _entry(table_ptr, count, pid, MAX_TENSORS: tl.constexpr):
    """The table row (a pointer to its WIDTH = 9 entries) of the tensor program pid works on: the
    last whose first program is <= pid."""
    t = tl.arange(0, MAX_TENSORS)
    first = tl.load(table_ptr + t * 9 + 8, mask=t < count, other=2**62)
    return table_ptr + (tl.sum((first <= pid).to(tl.int32), axis=0) - 1).to(tl.int64) * 9


@triton.jit
def count_kernel(is_forget_ptr, count_ptr, rows, COUNT_BLOCK: tl.constexpr):
    tl.store(count_ptr, _count_forget(is_forget_ptr, rows, COUNT_BLOCK))


@triton.jit
def forward_kernel(
    table_ptr, count, s_like_ptr, t_like_ptr, is_forget_ptr, partial_ptr, count_ptr, rows,
    retain_weight, forget_weight,
    NORMALIZE: tl.constexpr, WRITE_GRAD: tl.constexpr, INLINE_COUNT: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, STEPS: tl.constexpr, COUNT_BLOCK: tl.constexpr, MAX_TENSORS: tl.constexpr,
):
    pid = tl.program_id(0)
    e = _entry(table_ptr, count, pid, MAX_TENSORS)
    cols = tl.load(e + 7)
    s_stride, r_stride, f_stride = tl.load(e + 4), tl.load(e + 5), tl.load(e + 6)
    s_row = tl.load(e + 0).to(s_like_ptr.dtype, bitcast=True)
    r_row = tl.load(e + 1).to(t_like_ptr.dtype, bitcast=True)
    f_row = tl.load(e + 2).to(t_like_ptr.dtype, bitcast=True)
    g_row = tl.load(e + 3).to(s_like_ptr.dtype, bitcast=True)
    if ALIGNED:  # 16-byte aligned rows (the launcher checked): 16-byte loads and stores
        cols = tl.multiple_of(cols, 16)
        s_stride, r_stride, f_stride = tl.multiple_of(s_stride, 16), tl.multiple_of(r_stride, 16), \
            tl.multiple_of(f_stride, 16)
        s_row, r_row, f_row, g_row = tl.multiple_of(s_row, 16), tl.multiple_of(r_row, 16), \
            tl.multiple_of(f_row, 16), tl.multiple_of(g_row, 16)
    local = pid - tl.load(e + 8)
    chunks = (cols + BLOCK * STEPS - 1) // (BLOCK * STEPS)
    row = local // chunks
    begin = (local % chunks) * (BLOCK * STEPS)
    flag = tl.load(is_forget_ptr + row)
    forget = flag != 0
    is_retain = flag == 0
    # the table's addresses as pointers of the dtypes the *_like arguments carry
    s_row += row * s_stride
    # Each row reads only its own target: the other target's load is predicated off.
    r_row += row * r_stride
    f_row += row * f_stride
    g_row += row * cols
    coef = 0.0
    if WRITE_GRAD:
        if INLINE_COUNT:
            n_forget = _count_forget(is_forget_ptr, rows, COUNT_BLOCK)
        else:
            n_forget = tl.load(count_ptr)
        n_set = tl.where(forget, n_forget, rows - n_forget)
        w = tl.where(forget, forget_weight, retain_weight)
        coef = _grad_weight(w) * _set_norm(NORMALIZE, n_set, rows) * 2.0 / (cols * 1.0)
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
            tl.store(g_row + offs, (coef * d).to(s_like_ptr.dtype.element_ty), mask=m)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def finalize_kernel(
    partial_ptr, table_ptr, count, is_forget_ptr, loss_ptr, retain_loss_ptr, forget_loss_ptr,
    rows, retain_weight, forget_weight,
    NORMALIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    n_forget = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, rows, BLOCK):
        r = start + tl.arange(0, BLOCK)
        n_forget += (tl.load(is_forget_ptr + r, mask=r < rows, other=0) != 0).to(tl.int32)
    nf = tl.sum(n_forget, axis=0)
    norm_retain = _set_norm(NORMALIZE, rows - nf, rows)
    norm_forget = _set_norm(NORMALIZE, nf, rows)
    total_retain = 0.0
    total_forget = 0.0
    for i in range(0, count):  # the tensors in table order, rows in a fixed order: deterministic
        cols = tl.load(table_ptr + i * 9 + 7)
        first = tl.load(table_ptr + i * 9 + 8)
        chunks = (cols + CHUNK - 1) // CHUNK
        sum_retain = tl.zeros([BLOCK], dtype=tl.float32)
        sum_forget = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, rows, BLOCK):
            r = start + tl.arange(0, BLOCK)
            m = r < rows
            row_sum = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(0, chunks):
                row_sum += tl.load(partial_ptr + first + r.to(tl.int64) * chunks + c, mask=m, other=0.0)
            forget = tl.load(is_forget_ptr + r, mask=m, other=0) != 0
            sum_forget += tl.where(forget, row_sum, 0.0)
            sum_retain += tl.where(forget, 0.0, row_sum)
        total_retain += tl.sum(sum_retain, axis=0) / (cols * 1.0) * norm_retain
        total_forget += tl.sum(sum_forget, axis=0) / (cols * 1.0) * norm_forget
    tl.store(retain_loss_ptr, total_retain)
    tl.store(forget_loss_ptr, total_forget)
    tl.store(loss_ptr, retain_weight * total_retain + forget_weight * total_forget)


@triton.jit
def scale_kernel(
    table_ptr, count, g_like_ptr, is_forget_ptr, grad_loss_ptr, grad_retain_ptr, grad_forget_ptr,
    retain_weight, forget_weight,
    HAS_GRAD_LOSS: tl.constexpr, HAS_GRAD_RETAIN: tl.constexpr, HAS_GRAD_FORGET: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr, MAX_TENSORS: tl.constexpr,
):
    pid = tl.program_id(0)
    e = _entry(table_ptr, count, pid, MAX_TENSORS)
    cols = tl.load(e + 7)
    g_row = tl.load(e + 3).to(g_like_ptr.dtype, bitcast=True)
    if ALIGNED:
        cols = tl.multiple_of(cols, 16)
        g_row = tl.multiple_of(g_row, 16)
    local = pid - tl.load(e + 8)
    chunks = (cols + BLOCK * STEPS - 1) // (BLOCK * STEPS)
    row = local // chunks
    begin = (local % chunks) * (BLOCK * STEPS)
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
    g_row += row * cols
    for step in range(STEPS):
        offs = begin + step * BLOCK + tl.arange(0, BLOCK)
        m = offs < limit
        g = tl.load(g_row + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(g_row + offs, (g * scale).to(g_like_ptr.dtype.element_ty), mask=m)


def chunks_per_row(cols: int) -> int:
    return triton.cdiv(cols, BLOCK * STEPS)


def _aligned(entries) -> bool:
    """Whether every address of the table is 16-byte aligned and every stride and cols a multiple of
    16 elements (what Triton's own specialisation of pointer and int arguments looks for)."""
    return all(a % 16 == 0 for entry, _ in entries for a in entry[:4]) and \
        all(n % 16 == 0 for entry, _ in entries for n in entry[4:8])


def _table(entries, device) -> torch.Tensor:
    """The table as an int64 tensor on device, each row ending with its first program; copied from
    pinned memory without a host synchronisation. Returns (table, programs)."""
    rows, first = [], 0
    for entry, programs in entries:
        rows.append(entry + [first])
        first += programs
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table, first


@on_inputs_device
def forward(students, retains, forgets, is_forget, retain_weight, forget_weight, normalize, compute_grad):
    """(loss, retain_loss, forget_loss, grads) of lists of (rows, cols_i) inputs; grads is empty
    without compute_grad."""
    device, rows = students[0].device, students[0].shape[0]
    grads = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in students] if compute_grad else []
    entries = [([s.data_ptr(), r.data_ptr(), f.data_ptr(), grads[i].data_ptr() if grads else 0, s.stride(0),
                 r.stride(0), f.stride(0), s.shape[1]], rows * chunks_per_row(s.shape[1]))
               for i, (s, r, f) in enumerate(zip(students, retains, forgets))]
    table, programs = _table(entries, device)
    f32 = dict(dtype=torch.float32, device=device)
    partial = torch.empty(programs, **f32)
    count = torch.empty(1, dtype=torch.int32, device=device)
    inline_count = rows <= INLINE_COUNT_MAX_ROWS
    if compute_grad and not inline_count:
        count_kernel[(1,)](is_forget, count, rows, COUNT_BLOCK=COUNT_BLOCK)
    forward_kernel[(programs,)](
        table, len(students), students[0], retains[0], is_forget, partial, count, rows, retain_weight, forget_weight,
        NORMALIZE=normalize, WRITE_GRAD=compute_grad, INLINE_COUNT=inline_count, ALIGNED=_aligned(entries),
        BLOCK=BLOCK, STEPS=STEPS, COUNT_BLOCK=COUNT_BLOCK, MAX_TENSORS=MAX_TENSORS, num_warps=NUM_WARPS,
    )
    loss, retain_loss, forget_loss = (torch.empty((), **f32) for _ in range(3))
    finalize_kernel[(1,)](
        partial, table, len(students), is_forget, loss, retain_loss, forget_loss, rows, retain_weight,
        forget_weight, NORMALIZE=normalize, CHUNK=BLOCK * STEPS, BLOCK=FINALIZE_BLOCK, num_warps=4,
    )
    return loss, retain_loss, forget_loss, grads


@on_inputs_device
def scale_grad_(grads, is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight):
    """grads[i] (rows, cols_i) *= each row's backward scale, in place; None grads count as 0."""
    if not grads:
        return
    rows = grads[0].shape[0]
    entries = [([0, 0, 0, g.data_ptr(), 0, 0, 0, g.shape[1]], rows * chunks_per_row(g.shape[1])) for g in grads]
    table, programs = _table(entries, grads[0].device)
    g0 = grads[0]
    scale_kernel[(programs,)](
        table, len(grads), g0, is_forget, grad_loss if grad_loss is not None else g0,
        grad_retain if grad_retain is not None else g0, grad_forget if grad_forget is not None else g0,
        retain_weight, forget_weight,
        HAS_GRAD_LOSS=grad_loss is not None, HAS_GRAD_RETAIN=grad_retain is not None,
        HAS_GRAD_FORGET=grad_forget is not None, ALIGNED=_aligned(entries), BLOCK=BLOCK, STEPS=STEPS,
        MAX_TENSORS=MAX_TENSORS, num_warps=NUM_WARPS,
    )


def aot_variants():
    """(kernel, signature, constexprs, aligned int args, num_warps) of every variant the launchers
    can produce, for ahead-of-time compilation checks (kernels/aot.py)."""
    floats = dict(retain_weight="fp32", forget_weight="fp32")
    for s_ty, t_ty in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")):
        ptrs = dict(table_ptr="*i64", count="i32", s_like_ptr=f"*{s_ty}", t_like_ptr=f"*{t_ty}", is_forget_ptr="*u8",
                    partial_ptr="*fp32", count_ptr="*i32", rows="i32")
        for normalize in (0, 1, 2):
            for write_grad, inline_count in ((True, True), (True, False), (False, True)):
                for aligned in (True, False):
                    yield forward_kernel, {**ptrs, **floats}, dict(
                        NORMALIZE=normalize, WRITE_GRAD=write_grad, INLINE_COUNT=inline_count, ALIGNED=aligned,
                        BLOCK=BLOCK, STEPS=STEPS, COUNT_BLOCK=COUNT_BLOCK, MAX_TENSORS=MAX_TENSORS), (), NUM_WARPS
        for has in ((True, True, True), (True, False, False)):
            yield scale_kernel, dict(table_ptr="*i64", count="i32", g_like_ptr=f"*{s_ty}", is_forget_ptr="*u8",
                                     grad_loss_ptr="*fp32", grad_retain_ptr="*fp32", grad_forget_ptr="*fp32",
                                     **floats), dict(
                HAS_GRAD_LOSS=has[0], HAS_GRAD_RETAIN=has[1], HAS_GRAD_FORGET=has[2], ALIGNED=True, BLOCK=BLOCK,
                STEPS=STEPS, MAX_TENSORS=MAX_TENSORS), (), NUM_WARPS
    finalize = dict(partial_ptr="*fp32", table_ptr="*i64", count="i32", is_forget_ptr="*u8", loss_ptr="*fp32",
                    retain_loss_ptr="*fp32", forget_loss_ptr="*fp32", rows="i32", **floats)
    for normalize in (0, 1, 2):
        yield finalize_kernel, finalize, dict(NORMALIZE=normalize, CHUNK=BLOCK * STEPS, BLOCK=FINALIZE_BLOCK), (), 4
        # Triton passes an int argument equal to 1 as a constant (batch 1, one tensor).
        for one in ("rows", "count"):
            yield finalize_kernel, {k: v for k, v in finalize.items() if k != one}, {
                one: 1, "NORMALIZE": normalize, "CHUNK": BLOCK * STEPS, "BLOCK": FINALIZE_BLOCK}, (), 4
            yield forward_kernel, {k: v for k, v in dict(
                table_ptr="*i64", count="i32", s_like_ptr="*fp32", t_like_ptr="*fp32", is_forget_ptr="*u8",
                partial_ptr="*fp32", count_ptr="*i32", rows="i32", **floats).items() if k != one}, {
                one: 1, "NORMALIZE": normalize, "WRITE_GRAD": True, "INLINE_COUNT": True, "ALIGNED": False,
                "BLOCK": BLOCK,
                "STEPS": STEPS, "COUNT_BLOCK": COUNT_BLOCK, "MAX_TENSORS": MAX_TENSORS}, (), NUM_WARPS
    yield count_kernel, dict(is_forget_ptr="*u8", count_ptr="*i32", rows="i32"), dict(COUNT_BLOCK=COUNT_BLOCK), (), 4
