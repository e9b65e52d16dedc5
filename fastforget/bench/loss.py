"""`fastforget bench loss`: forward + backward of the forget/retain loss, per provider.

Providers: `eager` (the reference code's compute_loss with autograd), `compile` (torch.compile of
the same), and each fastforget backend that runs here. Bytes the op must move: read student and
one target per row, write the gradient; GB/s is that over the median time, beside the copy
bandwidth measured in the same run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..ops import backends, reference, unlearn_loss
from .timing import copy_bandwidth_gbs, median_ms

DEFAULT_SHAPE = (256, 50, 1024)  # MAE ViT-L latents: batch, tokens, width


@dataclass
class Row:
    provider: str
    ms: float
    gbs: float
    vs_eager: float
    note: str = ""


def make_inputs(shape, dtype, device, forget_fraction=0.5, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    retain = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    forget = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    is_forget = (torch.rand(shape[0], generator=gen) < forget_fraction).to(device)
    return student.requires_grad_(), retain, forget, is_forget


def bytes_moved(student) -> int:
    return 3 * student.numel() * student.element_size()


def providers(device: torch.device) -> dict:
    """name -> loss function of (student, retain, forget, is_forget), or the reason it is skipped."""
    def eager(s, r, f, m):
        return reference.reference_code_loss(s, r, f, m)

    found = {"eager": eager, "compile": torch.compile(eager)}
    for name in backends.BACKENDS:
        why = backends.unavailable_reason(name) or "; ".join(backends.device_reasons(name, device))
        if name == "triton" and device.type == "cpu":
            why = why or "the Triton interpreter is a correctness tool, not timed"
        found[name] = why or (lambda s, r, f, m, name=name: unlearn_loss(
            s, r, f, m, retain_weight=1.0, normalize="reference", backend=name).loss)
    return found


def run(shape=DEFAULT_SHAPE, dtype=torch.float32, device="cpu", reps=10) -> tuple[list[Row], float]:
    device = torch.device(device)
    student, retain, forget, is_forget = make_inputs(shape, dtype, device)
    nbytes = bytes_moved(student)
    copy_gbs = copy_bandwidth_gbs(nbytes // 3, device)
    rows, eager_ms = [], None
    for name, fn in providers(device).items():
        if isinstance(fn, str):
            rows.append(Row(name, float("nan"), float("nan"), float("nan"), f"skipped: {fn}"))
            continue

        def step(fn=fn):  # autograd.grad: the gradient itself, no accumulation into .grad
            return torch.autograd.grad(fn(student, retain, forget, is_forget), student)

        ms = median_ms(step, device, reps=reps)
        eager_ms = eager_ms or ms
        rows.append(Row(name, ms, nbytes / (ms * 1e-3) / 1e9, eager_ms / ms))
    return rows, copy_gbs


def format_table(rows, copy_gbs, shape, dtype, device) -> str:
    head = (f"unlearn_loss forward+backward, shape {tuple(shape)} {str(dtype).replace('torch.', '')} on {device}, "
            f"copy bandwidth {copy_gbs:.1f} GB/s, threads {torch.get_num_threads()}")
    lines = [head, f"{'provider':<10} {'ms':>9} {'GB/s':>8} {'% copy':>7} {'vs eager':>9}"]
    for r in rows:
        if r.note:
            lines.append(f"{r.provider:<10} {r.note}")
        else:
            lines.append(f"{r.provider:<10} {r.ms:9.3f} {r.gbs:8.1f} {100 * r.gbs / copy_gbs:6.0f}% {r.vs_eager:8.2f}x")
    return "\n".join(lines)


def main(args) -> int:
    shape = tuple(args.shape)
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows, copy_gbs = run(shape, dtype, device, reps=args.reps)
    table = format_table(rows, copy_gbs, shape, dtype, device)
    print(table)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a") as f:
            if new:
                f.write("provider,shape,dtype,device,ms,gbs,copy_gbs,vs_eager\n")
            for r in rows:
                if not r.note:
                    f.write(f"{r.provider},{'x'.join(map(str, shape))},{args.dtype},{device},{r.ms:.4f},"
                            f"{r.gbs:.2f},{copy_gbs:.2f},{r.vs_eager:.3f}\n")
    return 0
