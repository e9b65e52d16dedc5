"""pytest-benchmark suites on the CPU: each op's providers at a CPU-sized MAE shape.

    .venv/bin/python -m pytest benchmarks/ --benchmark-columns=median,iqr,ops

Providers as in `fastforget bench loss|patch|attention|teacher`: the eager reference formula, torch.compile
of it, and each fastforget backend that runs here (extra_info carries the bytes or FLOPs, so a
rate follows from the median).
"""
import pytest
import torch

from fastforget.bench import harness, loss as bench_loss, patch as bench_patch, teacher as bench_teacher
from fastforget.ops import make_teacher_batch, masked_patch_embed, qkv_attention, reference

CPU = torch.device("cpu")
LOSS_SHAPE = (64, 50, 1024)  # MAE ViT-L latents
LOSS = bench_loss.providers(CPU)
BACKENDS = [name for name, fn in harness.backend_providers(CPU, lambda name: name).items() if fn == name]


def _runnable(found):
    return [name for name, fn in found.items() if not isinstance(fn, str)]


@pytest.mark.parametrize("provider", _runnable(LOSS))
def test_unlearn_loss_forward_backward(benchmark, provider):
    student, retain, forget, is_forget = bench_loss.make_inputs(LOSS_SHAPE, torch.float32, CPU)
    fn = LOSS[provider]
    benchmark.extra_info["bytes"] = bench_loss.bytes_moved(student)
    benchmark(lambda: torch.autograd.grad(fn(student, retain, forget, is_forget), student))


@pytest.mark.parametrize("provider", ["eager", *BACKENDS])
def test_masked_patch_embed_forward_backward(benchmark, provider):
    images, params, ids_keep = bench_patch.make_inputs(16, 224, 16, 768, 0.75, torch.float32, CPU)
    fn = reference.masked_patch_embed if provider == "eager" else \
        (lambda *a: masked_patch_embed(*a, backend=provider))
    benchmark.extra_info["flops"] = bench_patch.flops(images, params, ids_keep)

    def step():
        out = fn(images, *params[:3], ids_keep, params[3])
        return torch.autograd.grad(out, params, grad_outputs=torch.ones_like(out))
    benchmark(step)


@pytest.mark.parametrize("provider", ["eager", *BACKENDS])
def test_make_teacher_batch(benchmark, provider):
    images = torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    is_forget = torch.arange(16) % 2 == 0
    fn = bench_teacher.eager_teacher_batch if provider == "eager" else \
        (lambda i, m: make_teacher_batch(i, m, backend=provider))
    benchmark.extra_info["bytes"] = images.numel() * images.element_size() * 2.5
    benchmark(lambda: fn(images, is_forget))


@pytest.mark.parametrize("provider", ["eager", *BACKENDS])
def test_qkv_attention_forward_backward(benchmark, provider):
    batch, tokens, heads, head_dim = 128, 17, 4, 16  # the digits model's encoder
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fn = reference.qkv_attention if provider == "eager" else (lambda x, h: qkv_attention(x, h, backend=provider))
    benchmark.extra_info["flops"] = 3 * 4 * batch * tokens * tokens * heads * head_dim
    benchmark(lambda: torch.autograd.grad(fn(qkv, heads).sum(), qkv))
