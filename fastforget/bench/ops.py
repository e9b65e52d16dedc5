"""`fastforget bench ops`: every op over the shapes that matter, every provider, against its roofline.

Shapes are MAE's and MAGE's: MAE ViT-B/L latents (1 + 49 tokens at mask 0.75, width 768/1024),
MAGE ViT-B latents (1 + 64 buffer + 128 kept tokens at mask 0.5, width 768), their patch
embeddings, their encoders' attention (and the digits model's: 17 tokens, 4 heads of 16) and
224x224 / 256x256 teacher batches, MAGE's VQGAN tokenizer (16384 rows, 1024 codes of 256) and token embedding (64 images, 128 of
256 tokens kept, width 768);
and Palette's at 256 px, per-GPU batch 12: its 13 encoder features in one loss, its GroupNorm
chains (the first level, 64 x 256 x 256, and the middle, 512 x 32 x 32) and its step inputs.
`large` is the GPU set; `small` shrinks the batches so the CPU finishes in minutes. Each row's
rate is the bytes or FLOPs the op must move or do over its time, beside the copy bandwidth or
matmul rate measured in the same run. Last, each op's call overhead at a tiny shape (bench overhead).
"""
from __future__ import annotations

import csv
import os

import torch

from . import attention, diffusion, group_norm, harness, loss, overhead, patch, plot, teacher
from . import vq
from . import token_embed

MAE_L, MAE_B, MAGE_B = (50, 1024), (50, 768), (193, 768)  # (tokens, width) of the encoders' latents

# (op, dtype name, arguments of that op's measure after dtype and device are taken out)
LARGE = [
    ("loss", "bfloat16", ((256, *MAE_L),)),
    ("loss", "float32", ((256, *MAE_L),)),
    ("loss", "bfloat16", ((256, *MAGE_B),)),
    ("loss", "bfloat16", ((4096, *MAE_L),)),
    ("patch", "bfloat16", (256, 224, 16, 1024, 0.75)),
    ("patch", "bfloat16", (256, 224, 16, 768, 0.75)),
    ("patch", "float32", (256, 224, 16, 1024, 0.75)),
    ("teacher", "float32", (256, 224)),
    ("teacher", "bfloat16", (256, 256)),
    ("teacher", "float32", (1024, 224)),
    ("palette_loss", "bfloat16", (12,)),
    ("group_norm", "bfloat16", ((12, 64, 256, 256),)),
    ("group_norm", "bfloat16", ((12, 512, 32, 32),)),
    ("group_norm", "float32", ((12, 64, 256, 256),)),
    ("diffusion_inputs", "bfloat16", ((12, 3, 256, 256),)),
    ("diffusion_inputs", "float32", ((12, 3, 256, 256),)),
    ("vq_quantize", "float32", (vq.MAGE_SHAPE,)),  # MAGE's tokenizer: 64 images of 16 x 16 tokens
    ("vq_quantize", "bfloat16", (vq.MAGE_SHAPE,)),
    ("token_embed", "bfloat16", (token_embed.MAGE_SHAPE,)),  # MAGE ViT-B: 64 images, 128 of 256 tokens kept
    ("token_embed", "float32", (token_embed.MAGE_SHAPE,)),
    # last: the suite's time limit cuts these first (each compiles eager attention); on GPUs the op
    # is torch's SDPA, measured for the dispatcher's record, not a fastforget kernel
    ("attention", "bfloat16", (256, 50, 16, 64)),
    ("attention", "bfloat16", (256, 50, 12, 64)),
]
SMALL = [
    ("loss", "float32", ((64, *MAE_L),)),
    ("loss", "bfloat16", ((64, *MAE_L),)),
    ("loss", "float32", ((64, *MAGE_B),)),
    ("patch", "float32", (16, 224, 16, 768, 0.75)),
    ("patch", "float32", (16, 224, 16, 1024, 0.75)),
    ("attention", "float32", (128, 17, 4, 16)),
    ("attention", "float32", (16, 50, 16, 64)),
    ("teacher", "float32", (16, 224)),
    ("teacher", "float32", (16, 256)),
    ("palette_loss", "float32", (2,)),
    ("group_norm", "float32", ((4, 64, 64, 64),)),
    ("group_norm", "float32", ((4, 512, 16, 16),)),
    ("diffusion_inputs", "float32", ((4, 3, 256, 256),)),
    ("vq_quantize", "float32", ((8 * 256, 1024, 256),)),
    ("token_embed", "float32", ((8, 256, 128, 768, 2025),)),
]
MEASURE = {"loss": loss.measure, "palette_loss": loss.measure_features, "patch": patch.measure,
           "attention": attention.measure, "teacher": teacher.measure, "group_norm": group_norm.measure,
           "diffusion_inputs": diffusion.measure, "vq_quantize": vq.measure,
           "token_embed": token_embed.measure}


def sweep(sizes: list, device: torch.device, reps: int, csv_path: str | None) -> list:
    results = []
    for op, dtype, shape_args in sizes:
        torch._dynamo.reset()  # each shape's torch.compile row is a static graph of its own, not a dynamic recompile
        measured = MEASURE[op](*shape_args, getattr(torch, dtype), device, reps)
        print(measured.table(), end="\n\n", flush=True)
        if csv_path:  # the plot too, row by row: a run cut short by a time limit still has one
            measured.append_csv(csv_path)
            draw(csv_path)
        results.append(measured)
    return results


def draw(csv_path: str) -> str:
    """Percent of the roofline per provider, one group per (op, shape, dtype, device): the latest
    row of each, as a PNG beside the CSV."""
    groups: dict[str, dict[str, float]] = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r["unit"] == "call":  # the overhead rows: microseconds, no roofline
                continue
            label = f"{r['op']} {r['shape'].replace(';', ' ')} {r['dtype']} {r['device']}"
            groups.setdefault(label, {})[r["provider"]] = 100 * float(r["rate"]) / float(r["ceiling"])
    path = os.path.splitext(csv_path)[0] + ".png"
    plot.bars(groups, "fastforget bench ops: % of the roofline measured in the same run", "% roofline", path,
              bar_w=18)
    return path


def main(args) -> int:
    device = harness.device_of(args)
    harness.csv_folder(args.csv)
    size = args.size or ("large" if device.type == "cuda" else "small")
    sweep(LARGE if size == "large" else SMALL, device, args.reps, args.csv)
    calls = overhead.measure(device, args.reps)  # last: what each call costs beyond its kernel
    print(overhead.table(calls))
    if args.csv:
        overhead.append_csv(args.csv, calls)
        print(f"wrote {args.csv} and {os.path.splitext(args.csv)[0]}.png")
    return 0
