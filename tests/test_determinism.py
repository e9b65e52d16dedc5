"""Determinism: every op on every backend repeats itself bit for bit, under torch's deterministic
mode too; the GPU kernels reduce without atomics; a deterministic training run repeats exactly."""
import pathlib
import re

import pytest
import torch

import fastforget
from fastforget.train import LoopConfig, PretrainConfig, UnlearnConfig, pretrain, unlearn
from fastforget.train.loop import deterministic_algorithms, load_checkpoint

from conftest import backend_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _each_op(backend, device):
    """Every op's outputs and gradients, on fresh inputs made from one seed."""
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(6, 17, 40, generator=gen).to(device).requires_grad_()
    retain, forget = (torch.randn(6, 17, 40, generator=gen).to(device) for _ in range(2))
    is_forget = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool, device=device)
    loss = fastforget.unlearn_loss(student, retain, forget, is_forget, backend=backend)
    out = [*loss, torch.autograd.grad(loss.loss, student)[0]]
    images = torch.rand(6, 3, 32, 32, generator=gen).to(device)
    weight, pos, cls = (torch.randn(*shape, generator=gen).to(device).requires_grad_()
                        for shape in ((24, 3, 8, 8), (1, 17, 24), (1, 1, 24)))
    ids_keep = torch.argsort(torch.rand(6, 16, generator=gen), dim=1)[:, :5].to(device)
    tokens = fastforget.masked_patch_embed(images, weight, None, pos, ids_keep, cls, backend=backend)
    out += [tokens, *torch.autograd.grad(tokens.square().sum(), (weight, pos, cls))]
    out.append(fastforget.make_teacher_batch(images, is_forget, generator=torch.Generator(device).manual_seed(3),
                                             backend=backend))
    x = torch.randn(6, 16, 5, 7, generator=gen).to(device).requires_grad_()
    scale, shift = (torch.randn(6, 16, generator=gen).to(device).requires_grad_() for _ in range(2))
    normed = fastforget.ops.group_norm_silu(x, None, None, 4, scale=scale, shift=shift, backend=backend)
    out += [normed, *torch.autograd.grad(normed.square().sum(), (x, scale, shift))]
    mask = (torch.rand(6, 1, 32, 32, generator=gen) > 0.5).to(device)
    out += fastforget.ops.make_diffusion_inputs(images, images, mask, torch.rand(6, generator=gen).to(device),
                                                is_forget, generator=torch.Generator(device).manual_seed(3),
                                                backend=backend)
    if device == "cpu" and backend in ("cpu", "torch"):  # attention's own kernel is the CPU's; GPUs run torch's SDPA
        qkv = torch.randn(6, 17, 48, generator=gen).requires_grad_()
        attended = fastforget.ops.qkv_attention(qkv, 2, backend=backend)
        out += [attended, torch.autograd.grad(attended.square().sum(), qkv)[0]]
    return out


@pytest.mark.parametrize("backend,device", backend_params())
def test_every_op_repeats_bitwise_under_deterministic_mode(backend, device):
    with deterministic_algorithms(True):
        first, second = _each_op(backend, device), _each_op(backend, device)
    assert torch.are_deterministic_algorithms_enabled() is False
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(first, _each_op(backend, device)))  # and without it


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_ops_run_on_their_inputs_device_not_the_current_one(backend):
    """Inputs on cuda:1 while cuda:0 is current (Triton launches on the current device unless told)."""
    torch.cuda.set_device(0)
    on_0, on_1 = _each_op(backend, "cuda:0"), _each_op(backend, "cuda:1")
    assert all(b.device == torch.device("cuda:1") for b in on_1)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(on_0, on_1))


def test_gpu_kernels_reduce_without_atomics():
    """Fixed-order partial sums instead: a regression guard over the CUDA and Triton sources."""
    sources = [*ROOT.glob("csrc/cuda/*.cu"), *ROOT.glob("csrc/cuda/*.cuh"), *ROOT.glob("kernels/*.py")]
    assert sources
    for path in sources:
        calls = re.findall(r"\batomic\w*\s*\(|tl\.atomic_\w+", path.read_text())
        assert not calls, f"{path.name} uses {calls}"


def test_a_deterministic_run_repeats_exactly(tmp_path):
    pretrain(PretrainConfig(device="cpu", loop=LoopConfig(out=str(tmp_path / "o"), epochs=0.1, batch_size=32,
                                                          progress=False)))
    for name in ("a", "b"):
        unlearn(UnlearnConfig(checkpoint=str(tmp_path / "o" / "checkpoint.pt"), forget_classes=("0",),
                              retain_classes=("1",), device="cpu",
                              loop=LoopConfig(out=str(tmp_path / name), epochs=0.5, batch_size=16, progress=False,
                                              deterministic=True)))
    assert torch.are_deterministic_algorithms_enabled() is False
    a, b = (load_checkpoint(str(tmp_path / n / "checkpoint.pt")) for n in ("a", "b"))
    assert a["step"] == b["step"] > 0
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
