"""`fastforget bench data`: how fast the streamed path decodes an image folder, per worker and in
all, against the images/s a model's step takes, so that a run can be given enough workers.

The decoding is the streamed run's own (train/batches.py: DataLoader workers reading whole batches
with data.read_pixels, uint8 pixels as a GPU run takes them), over the folder's first --images
files (repeated when it holds fewer). A rate counts from the first batch's arrival to the last, so
the workers' start-up is left out."""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

from .. import families
from ..distributed import Dist
from ..errors import InvalidValue
from ..train import batches as batches_lib, data as data_lib
from ..train.augment import source_size
from . import harness
from .timing import median_ms, sync


def decode_rate(files: list[str], size: int, workers: int, batch: int) -> float:
    """Images/s that `workers` DataLoader processes (0: this process) decode `files` at size² in
    batches of `batch`, from the first batch's arrival to the last's."""
    keys = [(i, 0, list(range(start, min(start + batch, len(files))))) for i, start in
            enumerate(range(0, len(files), batch))]
    loader = torch.utils.data.DataLoader(batches_lib._Files(files, size, as_float=False), sampler=keys,
                                         batch_size=None, num_workers=workers,
                                         prefetch_factor=batches_lib.PREFETCH if workers else None)
    first, count = None, 0
    for _, _, pixels in loader:
        if isinstance(pixels, str):
            raise InvalidValue(f"bench data: image file {pixels} cannot be read")
        if first is None:
            first = time.perf_counter()
        else:
            count += pixels.shape[0]
    return count / max(time.perf_counter() - first, 1e-9) if count else float("nan")


def step_rate(model: str, batch: int, device: torch.device) -> float:
    """Images/s of fastforget's unlearning step for `model` at `batch` on `device` (bench step's)."""
    from .step import Spec, build

    family = families.of_model(model)
    spec = Spec("fastforget", model, batch, family.check_option("mask_ratio", None), str(device))
    _, step = build(spec)
    ms = median_ms(step, device, warmup=2, reps=5, min_time_s=2.0)
    sync(device)
    return batch / (ms * 1e-3)


def worker_counts(text: Optional[str]) -> list[int]:
    if text is None:
        cores = os.cpu_count() or 1
        return [w for w in (1, 2, 4, 8, 16) if w <= cores] or [1]
    try:
        counts = [int(w) for w in text.split(",") if w]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise InvalidValue(f"--workers must be comma-separated ints >= 0 (0: decode in this process), got {text!r}")
    return counts


def main(args) -> int:
    workers = worker_counts(args.workers)
    size = args.size
    if args.model:
        try:
            family = families.of_model(args.model)
        except InvalidValue as err:
            raise InvalidValue(f"--model: {err}") from None
        if size is None:
            side = family.image_shape(family.create(args.model))[1]
            size = source_size(side, family.folder_augment)
    size = size or 256
    index = data_lib.load(args.data, size, what="--data directory")
    files = (index.files * math.ceil(args.images / len(index.files)))[:args.images]
    kb = sum(os.path.getsize(f) for f in index.files[:args.images]) / min(args.images, len(index.files)) / 1024
    print(f"decoding {len(files)} files of {args.data} (mean {kb:.0f} KB a file) to {size}² RGB uint8, in batches of "
          f"{args.batch_size}, on {os.cpu_count()} cores", flush=True)
    print(f"{'workers':>8} {'images/s':>10} {'per worker':>11} {'MB/s out':>9}", flush=True)
    rates = {}
    for w in workers:
        rates[w] = decode_rate(files, size, w, args.batch_size)
        per = rates[w] / max(w, 1)
        print(f"{w:8d} {rates[w]:10.1f} {per:11.1f} {rates[w] * 3 * size * size / 2**20:9.1f}", flush=True)
    if args.model:
        device = harness.device_of(args)
        need = step_rate(args.model, args.step_batch, device)
        per = max(rates[w] / max(w, 1) for w in rates)
        print(f"the step of {args.model} at batch {args.step_batch} on {device} takes {need:.1f} images/s: "
              f"{math.ceil(need / per)} workers at {per:.1f} images/s each keep up with it", flush=True)
    return 0
