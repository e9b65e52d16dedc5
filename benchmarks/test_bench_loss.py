"""pytest-benchmark suite for unlearn_loss forward+backward on the CPU.

    .venv/bin/python -m pytest benchmarks/ --benchmark-columns=median,iqr,ops

Providers as in `fastforget bench loss`: the reference code's formula eagerly, torch.compile of it,
and each fastforget backend that runs here. Shape: MAE ViT-L latents at a CPU-sized batch.
"""
import pytest
import torch

from fastforget.bench import loss as bench_loss

SHAPE = (64, 50, 1024)
PROVIDERS = bench_loss.providers(torch.device("cpu"))


@pytest.mark.parametrize("provider", [name for name, fn in PROVIDERS.items() if not isinstance(fn, str)])
def test_unlearn_loss_forward_backward(benchmark, provider):
    student, retain, forget, is_forget = bench_loss.make_inputs(SHAPE, torch.float32, "cpu")
    fn = PROVIDERS[provider]
    benchmark.extra_info["bytes"] = bench_loss.bytes_moved(student)
    benchmark(lambda: torch.autograd.grad(fn(student, retain, forget, is_forget), student))
