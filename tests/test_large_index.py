"""Tensors past 2^31 elements: the native kernels index with 64 bits.

Each test puts the only non-zero data past element 2^31 of a bfloat16 tensor (4 GiB), so a kernel
that wrapped its index at 32 bits would read zeros (or another row) and fail. Inputs are lazily
zeroed memory, but outputs are real: the loss's gradient and the teacher batch are 4 GiB each, so
the CPU tests need about 6 GB free (they skip with less). The GPU runs the same tests for the cuda
and Triton backends.
"""
import numpy as np
import pytest
import torch

import fastforget
from fastforget.ops import reference
from fastforget.ops.teacher_batch import noise_stream

ROW = 1 << 20
ROWS = (1 << 31) // ROW + 1  # the last row starts at element 2^31


def _available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return float("inf")


needs_memory = pytest.mark.skipif(_available_gb() < 6, reason="needs about 6 GB of free memory")


def zeros(*shape, device):
    """bfloat16 zeros; on the CPU from calloc, so untouched pages cost no memory."""
    if device != "cpu":
        return torch.zeros(*shape, dtype=torch.bfloat16, device=device)
    return torch.from_numpy(np.zeros(shape, dtype=np.uint16)).view(torch.bfloat16)


LARGE = [pytest.param("cpu", "cpu", id="cpu-cpu", marks=needs_memory)] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu) for b in ("cuda", "triton")]


@pytest.mark.parametrize("backend,device", LARGE)
def test_loss_reads_and_writes_past_2_31(backend, device):
    gen = torch.Generator().manual_seed(0)
    student = zeros(ROWS, ROW, device=device)
    student[-1] = torch.randn(ROW, generator=gen).to(device, torch.bfloat16)
    student.requires_grad_()
    target = zeros(ROWS, ROW, device=device)
    is_forget = torch.zeros(ROWS, dtype=torch.bool, device=device)
    is_forget[-1] = True
    out = fastforget.unlearn_loss(student, target, target, is_forget, normalize="set", backend=backend)
    want = student[-1].detach().float().square().mean()
    torch.testing.assert_close(out.forget_loss, want, rtol=1e-5, atol=0)
    assert float(out.retain_loss.detach()) == 0.0
    (grad,) = torch.autograd.grad(out.loss, student)
    expected_last = (0.2 * 2 / ROW * student[-1].detach().float()).to(torch.bfloat16)
    torch.testing.assert_close(grad[-1], expected_last, rtol=1e-2, atol=1e-9)
    assert not grad[-2].any()
    del grad, out


@pytest.mark.parametrize("backend,device", LARGE)
def test_teacher_batch_writes_noise_past_2_31(backend, device):
    images = zeros(ROWS, ROW, device=device)
    is_forget = torch.zeros(ROWS, dtype=torch.bool, device=device)
    is_forget[-1] = True
    out = fastforget.make_teacher_batch(images, is_forget, noise="uniform", clamp=(0.0, 1.0),
                                        generator=torch.Generator(device).manual_seed(7), backend=backend)
    stream = noise_stream(torch.device(device), torch.Generator(device).manual_seed(7), 0)
    want = reference.teacher_noise(ROW, "uniform", stream[0], device, first=(ROWS - 1) * ROW)
    torch.testing.assert_close(out[-1].float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert not out[-2].any()


@pytest.mark.parametrize("backend,device", LARGE)
def test_patch_embed_gathers_past_2_31(backend, device):
    """(B, 1, 1024, 1024) bfloat16 images, B * 2^20 > 2^31: only the last image is non-zero."""
    gen = torch.Generator().manual_seed(1)
    images = zeros(ROWS, 1, 1024, 1024, device=device)
    images[-1] = torch.rand(1, 1024, 1024, generator=gen).to(device, torch.bfloat16)
    patch, dim = 64, 8
    weight = torch.randn(dim, 1, patch, patch, generator=gen).to(device, torch.bfloat16)
    pos = torch.zeros(1, 1 + (1024 // patch) ** 2, dim, dtype=torch.bfloat16, device=device)
    ids_keep = torch.tensor([[0, 255]] * ROWS, device=device)
    got = fastforget.masked_patch_embed(images, weight, None, pos, ids_keep, backend=backend)
    want = reference.masked_patch_embed(images[-1:].float(), weight.float(), None, pos.float(), ids_keep[-1:])
    torch.testing.assert_close(got[-1:].float(), want, rtol=2e-2, atol=2e-2)
    assert not got[-2].any()


@needs_memory
def test_attention_reads_and_writes_past_2_31():
    """qkv of 2^31 + elements (16 tokens, one head of 16): the last image's pair starts past 2^31."""
    tokens, width = 16, 48
    images = (1 << 31) // (tokens * width) + 1
    qkv = zeros(images, tokens, width, device="cpu")
    last = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    qkv[-1] = last[0]
    out = fastforget.ops.qkv_attention(qkv, 1, backend="cpu")
    torch.testing.assert_close(out[-1:].float(), reference.qkv_attention(last.float(), 1), rtol=2e-2, atol=2e-2)
    assert not out[-2].any()  # zeros attend uniformly to zero values
