"""pytest-benchmark suite on the CPU: one whole unlearning step of mae_vit_tiny, per provider.

    .venv/bin/python -m pytest benchmarks/test_bench_step.py --benchmark-columns=median,iqr,ops

The providers of `fastforget bench step` (reference loop, plain PyTorch, fastforget's trainer
step), built here in one process; `fastforget bench step` runs each in its own process and adds
peak memory and MFU.
"""
import pytest

from fastforget.bench import step as bench_step

BATCH = 128


@pytest.mark.parametrize("provider", bench_step.PROVIDERS)
def test_unlearning_step(benchmark, provider):
    spec = bench_step.Spec(provider, "mae_vit_tiny", BATCH, 0.75, "cpu")
    model, step = bench_step.build(spec)
    benchmark.extra_info["images"] = BATCH
    benchmark.extra_info["flops"] = bench_step.step_flops(model, BATCH, 0.75)
    benchmark(step)
