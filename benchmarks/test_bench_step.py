"""pytest-benchmark suite on the CPU: one whole unlearning step of mae_vit_tiny, palette_tiny
and mage_tiny, per provider.

    .venv/bin/python -m pytest benchmarks/test_bench_step.py --benchmark-columns=median,iqr,ops

The providers of `fastforget bench step` (reference loop, plain PyTorch, fastforget's trainer
step), built here in one process; `fastforget bench step` runs each in its own process and adds
peak memory and MFU.
"""
import pytest

from fastforget import families
from fastforget.bench import step as bench_step, steps

# (model, batch, mask ratio): MAE's at its step benchmark's batch, Palette's at the issue's
MODELS = [("mae_vit_tiny", 128, 0.75), ("palette_tiny", 64, None), ("mage_tiny", 64, None)]


@pytest.mark.parametrize("model_name,batch,mask_ratio", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("provider", bench_step.PROVIDERS)
def test_unlearning_step(benchmark, provider, model_name, batch, mask_ratio):
    spec = bench_step.Spec(provider, model_name, batch, mask_ratio, "cpu")
    model, step = bench_step.build(spec)
    benchmark.extra_info["images"] = batch
    benchmark.extra_info["flops"] = steps.of(families.of_model(model_name).name).flops(model, spec)
    benchmark(step)
