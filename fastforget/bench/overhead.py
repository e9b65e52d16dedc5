"""`fastforget bench overhead`: what an op call costs beyond its kernel, at a tiny shape.

For each op, forward and backward (the teacher batch has no backward), three ways on one device:
`eager`, its plain PyTorch reference with autograd; `kernel`, the kernels the op runs (the backend
dispatch picks here) called directly on prepared inputs, with its backward's own work; and
`fastforget`, the public call as a training loop makes it (validation, dispatch, autograd). At a
tiny shape the kernels' work is nearly nothing, so fastforget - kernel is the price of the call
path, paid on the host on every call, on a GPU too. Times are what a loop gets: on CUDA the slower
of the host's launches and the GPU's work.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..ops import backends, make_teacher_batch, masked_patch_embed, qkv_attention, reference, unlearn_loss
from ..ops.teacher_batch import noise_stream
from .teacher import eager_teacher_batch
from .timing import median_ms, paired_rounds, sync, unsettled_note

PROVIDERS = ("eager", "kernel", "fastforget")


@dataclass
class Overhead:
    op: str
    shape: str
    device: str
    us: dict  # provider -> microseconds per call (the median of paired rounds)
    note: str = ""

    @property
    def extra_us(self) -> float:
        return self.us["fastforget"] - self.us["kernel"]


def _grad(out, inputs):
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


def _loss(device, native):
    s = torch.randn(4, 8, device=device, requires_grad=True)
    r, f = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    m = torch.tensor([1, 0, 1, 0], dtype=torch.bool, device=device)
    flags, one = m.view(torch.uint8), torch.ones((), device=device)

    def kernel():
        grads = native.unlearn_loss_forward([s.detach()], [r], [f], flags, 1.0, 0.2, 0, True)[3]  # normalize "set"
        native.unlearn_loss_scale_grad(grads, flags, one, None, None, 1.0, 0.2)

    return "4x8", {"eager": lambda: _grad(reference.unlearn_loss(s, r, f, m)[0], s), "kernel": kernel,
                   "fastforget": lambda: _grad(unlearn_loss(s, r, f, m).loss, s)}


def _patch(device, native):
    op = importlib.import_module("fastforget.ops.patch_embed")
    images = torch.rand(2, 1, 8, 8, device=device)
    weight, bias = torch.randn(16, 1, 2, 2, device=device), torch.randn(16, device=device)
    pos, cls = torch.randn(1, 17, 16, device=device), torch.randn(1, 1, 16, device=device)
    params = [t.requires_grad_() for t in (weight, bias, pos, cls)]
    ids = torch.argsort(torch.rand(2, 16, device=device), dim=1)[:, :4].contiguous()

    def kernel():  # the forward kernel, then the op's own backward (GEMMs) on its saved inputs
        out = native.masked_patch_embed(images, weight.detach(), bias.detach(), pos.detach(), ids, cls.detach())
        ctx = SimpleNamespace(saved_tensors=(images, ids), needs_input_grad=(False, True, True, True, False, True),
                              weight_shape=weight.shape, has_bias=True, has_cls=True, length=16)
        op._backward(ctx, torch.ones_like(out))

    return "B=2 1x8x8 p=2 D=16 K=4", {
        "eager": lambda: _grad(reference.masked_patch_embed(images, *params[:3], ids, cls), params),
        "kernel": kernel, "fastforget": lambda: _grad(masked_patch_embed(images, *params[:3], ids, cls), params)}


def _attention(device, native):
    qkv = torch.randn(2, 5, 24, device=device, requires_grad=True)

    def kernel():
        out, lse = native.qkv_attention_forward(qkv.detach(), 2)
        native.qkv_attention_backward(torch.ones_like(out), qkv.detach(), out, lse, 2)

    return "B=2 T=5 H=2 d=4", {"eager": lambda: _grad(reference.qkv_attention(qkv, 2), qkv), "kernel": kernel,
                               "fastforget": lambda: _grad(qkv_attention(qkv, 2), qkv)}


def _teacher(device, native):
    images = torch.rand(2, 1, 8, 8, device=device)
    m = torch.tensor([1, 0], dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    stream = noise_stream(device, gen, 0)
    return "B=2 1x8x8 (forward only)", {
        "eager": lambda: eager_teacher_batch(images, m), "kernel": lambda: native.make_teacher_batch(
            images, m.view(torch.uint8), stream, 0, 0.0, 1.0),
        "fastforget": lambda: make_teacher_batch(images, m, generator=gen)}


OPS = {"unlearn_loss": _loss, "masked_patch_embed": _patch, "qkv_attention": _attention,
       "make_teacher_batch": _teacher}


def measure(device: torch.device, reps: int = 10) -> list[Overhead]:
    """Each op's three providers in paired rounds (eager the baseline), in microseconds per call."""
    name = backends.AUTO_ORDER[device.type][0]  # the native backend the dispatcher takes first here
    native = backends.native.ops(name)
    out = []
    for op, make in OPS.items():
        shape, calls = make(device, native)
        for call in calls.values():
            for _ in range(20):
                call()
        sync(device)
        result = paired_rounds({p: (lambda c=c: median_ms(c, device, warmup=0, reps=max(reps, 200),
                                                          min_time_s=0.05)) for p, c in calls.items()}, "eager")
        out.append(Overhead(op, shape, str(device), {p: 1e3 * result[p].ms for p in calls}, unsettled_note(result)))
    return out


def table(results: list[Overhead]) -> str:
    device = results[0].device if results else ""
    lines = [f"op call overhead at tiny shapes on {device}, threads {torch.get_num_threads()}: microseconds per call, "
             f"forward + backward",
             f"{'op':<20} {'shape':<24} {'eager':>8} {'kernel':>8} {'fastforget':>11} {'fastforget - kernel':>20}"]
    for r in results:
        lines.append(f"{r.op:<20} {r.shape:<24} {r.us['eager']:8.1f} {r.us['kernel']:8.1f} {r.us['fastforget']:11.1f} "
                     f"{r.extra_us:+20.1f}")
        if r.note:
            lines.append(f"  {r.note}")
    return "\n".join(lines)


def append_csv(path: str, results: list[Overhead]) -> None:
    """Rows in bench ops' CSV format: op "overhead:<op>", ms per call, no rate or ceiling."""
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("op,provider,shape,dtype,device,ms,rate,unit,ceiling,vs_eager,spread\n")
        for r in results:
            for provider, us in r.us.items():
                f.write(f"overhead:{r.op},{provider},{r.shape.replace(' ', ';')},float32,{r.device},{us / 1e3:.6f},"
                        f"nan,call,nan,{r.us['eager'] / us:.3f},nan\n")


def main(args) -> int:
    from . import harness

    results = measure(harness.device_of(args), args.reps)
    print(table(results))
    if args.csv:
        append_csv(args.csv, results)
    return 0
