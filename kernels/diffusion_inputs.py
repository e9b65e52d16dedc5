"""The diffusion family's step inputs in Triton: the student's and the routed teacher's, one pass.

Per image b: out[b] = cat(y_cond[b], noisy[b]) for both outputs, noisy as
csrc/common/diffusion_inputs.h defines it. Programs 0 .. cond_chunks-1 of an image copy its
condition into both outputs; the rest compute the noisy channels, drawing eps from fastforget's
Philox stream (kernels/teacher_batch.py's, so every backend draws the same noise) or loading it.
"""
import torch
import triton
import triton.language as tl

from .launch import on_inputs_device
from .teacher_batch import _noise

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def inputs_kernel(y0_ptr, cond_ptr, mask_ptr, gammas_ptr, forget_ptr, noise_ptr, stream_ptr, student_ptr, teacher_ptr,
                  noisy_numel, cond_numel, positions, mask_channels, cond_chunks,
                  GIVEN: tl.constexpr, BLOCK: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    width = cond_numel + noisy_numel
    out = image * width
    if chunk < cond_chunks:  # the condition, as it is, into both outputs
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        m = offs < cond_numel
        c = tl.load(cond_ptr + image * cond_numel + offs, mask=m)
        tl.store(student_ptr + out + offs, c, mask=m)
        tl.store(teacher_ptr + out + offs, c, mask=m)
    else:
        offs = (chunk - cond_chunks) * BLOCK + tl.arange(0, BLOCK)
        m = offs < noisy_numel
        at = image * noisy_numel + offs
        y = tl.load(y0_ptr + at, mask=m, other=0.0).to(tl.float32)
        if GIVEN:
            eps = tl.load(noise_ptr + at, mask=m, other=0.0).to(tl.float32)
        else:
            seed = tl.load(stream_ptr).to(tl.uint64)
            first = tl.load(stream_ptr + 1)
            eps = _noise(first + at, seed, 0.0, 1.0, 0.0, 1.0, 0)  # 0: teacher_batch.NORMAL
        where = tl.where(mask_channels == 1, offs % positions, offs)
        hole = tl.load(mask_ptr + image * mask_channels * positions + where, mask=m, other=0) != 0
        gamma = tl.load(gammas_ptr + image)
        x_t = tl.sqrt_rn(gamma) * y + tl.sqrt_rn(1.0 - gamma) * eps
        forget = tl.load(forget_ptr + image) != 0
        student = tl.where(hole, x_t, y)
        teacher = tl.where(hole, tl.where(forget, eps, x_t), y)
        tl.store(student_ptr + out + cond_numel + offs, student.to(student_ptr.dtype.element_ty), mask=m)
        tl.store(teacher_ptr + out + cond_numel + offs, teacher.to(teacher_ptr.dtype.element_ty), mask=m)


@on_inputs_device
def make_diffusion_inputs(y_0, y_cond, mask, gammas, is_forget, noise, stream, given: bool):
    """Contiguous inputs as fastforget/ops/diffusion_inputs.py passes them -> (student, teacher)."""
    batch, channels, height, width = y_0.shape
    positions = height * width
    shape = (batch, y_cond.shape[1] + channels, height, width)
    student = y_0.new_empty(shape)
    teacher = y_0.new_empty(shape)
    noisy_numel, cond_numel = channels * positions, y_cond.shape[1] * positions
    cond_chunks = triton.cdiv(cond_numel, BLOCK)
    grid = (batch, cond_chunks + triton.cdiv(noisy_numel, BLOCK))
    inputs_kernel[grid](y_0, y_cond, mask, gammas, is_forget, noise if given else y_0, stream, student, teacher,
                        noisy_numel, cond_numel, positions, mask.shape[1], cond_chunks, GIVEN=given, BLOCK=BLOCK,
                        num_warps=NUM_WARPS)
    return student, teacher


def aot_variants():
    """As kernels/unlearn_loss.py's: every dtype, noise given (in the dtype) or drawn."""
    for ty in ("fp32", "bf16", "fp16"):
        for given in (True, False):
            yield inputs_kernel, dict(y0_ptr=f"*{ty}", cond_ptr=f"*{ty}", mask_ptr="*u8", gammas_ptr="*fp32",
                                      forget_ptr="*u8", noise_ptr=f"*{ty}", stream_ptr="*i64", student_ptr=f"*{ty}",
                                      teacher_ptr=f"*{ty}", noisy_numel="i32", cond_numel="i32", positions="i32",
                                      mask_channels="i32", cond_chunks="i32"), dict(GIVEN=given, BLOCK=BLOCK), (
                "noisy_numel", "cond_numel"), NUM_WARPS
