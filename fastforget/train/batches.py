"""Where a step's batch comes from: images held in memory, or image files streamed from disk.

Both follow the same order, a function of (seed, epoch), and give each rank its slice of the
global batch. Held images (the digits; image folders that fit the memory budget) are decoded once
and indexed. Streamed ones are decoded ahead of the step by DataLoader worker processes, with the
function that decodes the held ones, into pinned memory on the GPU: the same pixels, so a
streaming run and an in-memory run of the same settings train the same parameters, bit for bit
on the CPU, resumed mid-epoch or not.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..console import say
from ..distributed import Dist
from ..errors import InvalidValue, UnreadableData
from . import data as data_lib

# Held sets up to this size live on the GPU: a step's batch is then an index, with no host copy.
DEVICE_DATA_BYTES = 2 << 30
MEMORY_SHARE = 0.5  # the default budget: this share of the machine's free memory, split over its ranks
MAX_WORKERS = 12  # the default worker count at most: MAE-L on an H200 needs about 9 (README, bench data)
PREFETCH = 2  # batches each worker decodes ahead

EpochOrder = Callable[[int], tuple[Tensor, Optional[Tensor]]]  # epoch -> (order, is_forget or None), on the CPU


class RankRows:
    """Which rows of the data set (step, micro) of this rank takes: its slice of the epoch's order,
    (index, is_forget or None). The epoch's order is computed once, moved to `index_device` (where
    the images are) and its is_forget to the step's device."""

    def __init__(self, epoch_order: EpochOrder, steps_per_epoch: int, batch_size: int, accum_steps: int, d: Dist,
                 index_device: torch.device = torch.device("cpu")):
        self.epoch_order, self.steps_per_epoch = epoch_order, steps_per_epoch
        self.batch_size, self.accum_steps, self.d, self.index_device = batch_size, accum_steps, d, index_device
        self._epoch, self._order = None, None

    def at(self, step: int, micro: int) -> tuple[Tensor, Optional[Tensor]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            order, is_forget = self.epoch_order(epoch)
            self._epoch = epoch
            self._order = (order.to(self.index_device), None if is_forget is None else is_forget.to(self.d.device))
        order, is_forget = self._order
        start = ((within * self.accum_steps + micro) * self.d.world + self.d.rank) * self.batch_size
        rows = slice(start, start + self.batch_size)
        return order[rows], None if is_forget is None else is_forget[rows]

    def next_key(self, step: int, micro: int) -> tuple[int, int]:
        return (step, micro + 1) if micro + 1 < self.accum_steps else (step + 1, 0)


def _batch(pixels: Tensor, is_forget: Optional[Tensor], d: Dist) -> tuple[Tensor, ...]:
    images = data_lib.unit_float(pixels.to(d.device, non_blocking=True))
    return (images,) if is_forget is None else (images, is_forget)


def stage(images: Tensor, d: Dist) -> Tensor:
    """Held images where batches are cheapest to take from: the GPU when they fit in
    DEVICE_DATA_BYTES, else pinned memory (on the CPU as they are)."""
    if d.device.type != "cuda":
        return images
    return images.to(d.device) if images.numel() * images.element_size() <= DEVICE_DATA_BYTES else images.pin_memory()


class HeldBatches:
    """batches(step, micro) from staged images, indexed where they are (rows' index_device)."""

    def __init__(self, images: Tensor, rows: RankRows, d: Dist):
        self.images, self.rows, self.d = images, rows, d

    def __call__(self, step: int, micro: int) -> tuple[Tensor, ...]:
        index, is_forget = self.rows.at(step, micro)
        return _batch(self.images[index], is_forget, self.d)


class _Files(torch.utils.data.Dataset):
    """A worker's item: (step, micro, the batch's files) -> (step, micro, the batch (B, 3, S, S), or
    the first unreadable file as a string). The batch is uint8 pixels for a GPU, which converts them
    there; for a CPU step it is the floats unit_float makes, made here: a float batch made in the
    step's process from a worker's would come from its malloc heap, which glibc keeps growing
    (RSS +4 MB a step at 160², seen here) as shared-memory batches come and go."""

    def __init__(self, files: list[str], size: int, as_float: bool):
        self.files, self.size, self.as_float = files, size, as_float

    def __getitem__(self, key):
        step, micro, index = key
        pixels = []
        for i in index:
            read = data_lib.read_pixels(self.files[i], self.size)
            if isinstance(read, str):
                return step, micro, read
            pixels.append(read)
        batch = torch.stack(pixels)
        return step, micro, data_lib.unit_float(batch) if self.as_float else batch


class _Keys(torch.utils.data.Sampler):
    """The steps' batches from (step, micro) on, in the order the loop takes them, without end."""

    def __init__(self, rows: RankRows, step: int, micro: int):
        self.rows, self.start = rows, (step, micro)

    def __iter__(self):
        step, micro = self.start
        while True:
            yield step, micro, self.rows.at(step, micro)[0].tolist()
            step, micro = self.rows.next_key(step, micro)


class StreamedBatches:
    """batches(step, micro) from image files, decoded ahead by `workers` DataLoader processes
    (PREFETCH batches each). A call out of sequence (the first, or a resumed run's) starts the
    loader there."""

    def __init__(self, files: list[str], size: int, rows: RankRows, d: Dist, workers: int):
        self.files, self.size, self.d, self.workers = files, size, d, workers
        self.rows, self._sampler_rows = rows, copy.copy(rows)  # the sampler runs ahead: an epoch cache of its own
        self._loader, self._expected = None, None

    def __call__(self, step: int, micro: int) -> tuple[Tensor, ...]:
        if self._expected != (step, micro):
            self._loader = None  # its workers stop before new ones start
            on_cpu = self.d.device.type == "cpu"
            self._loader = iter(torch.utils.data.DataLoader(
                _Files(self.files, self.size, as_float=on_cpu), sampler=_Keys(self._sampler_rows, step, micro),
                batch_size=None, num_workers=self.workers, prefetch_factor=PREFETCH if self.workers else None,
                pin_memory=not on_cpu))
        got_step, got_micro, pixels = next(self._loader)
        assert (got_step, got_micro) == (step, micro), f"streamed batch {(got_step, got_micro)} for {(step, micro)}"
        if isinstance(pixels, str):
            raise UnreadableData(f"image file {pixels} could not be read at step {step} (it was readable when the "
                                 f"run started)")
        self._expected = self.rows.next_key(step, micro)
        return _batch(pixels, self.rows.at(step, micro)[1], self.d)


def free_memory_bytes() -> int:
    """The memory this machine can still give (MemAvailable; where there is no /proc, the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ranks_here() -> int:
    """The processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE), each holding its own copy."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def memory_budget(memory_mb: Optional[float]) -> tuple[int, str]:
    """(bytes, where they come from) for holding decoded images in this process."""
    if memory_mb is not None:
        return int(memory_mb * 2**20), "--data-memory-mb"
    free, ranks = free_memory_bytes(), ranks_here()
    per_rank = f", over {ranks} ranks on this machine" if ranks > 1 else ""
    return int(MEMORY_SHARE * free / ranks), f"the default: half the {free / 2**20:,.0f} MB free{per_rank}"


def default_workers() -> int:
    """Decoding processes per rank: the cores this rank can spare, one kept for the step, up to MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores // ranks_here() - 1))


def check_workers(workers) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise InvalidValue(f"data_workers (--data-workers) must be None or an int >= 0 (0: decode in the step's "
                           f"process), got {workers!r}")


def check_memory_mb(memory_mb) -> None:
    ok = memory_mb is None or (isinstance(memory_mb, (int, float)) and not isinstance(memory_mb, bool)
                               and 0 <= memory_mb < float("inf"))
    if not ok:
        raise InvalidValue(f"data_memory_mb (--data-memory-mb) must be None or a number >= 0 (0: always stream), "
                           f"got {memory_mb!r}")


@dataclass
class Feed:
    """The chosen sets, read (held) or checked (streamed), and how to batch them."""
    parts: list  # the ImageSets, after any skipped files
    images: Optional[Tensor] = None  # held: the parts' images, concatenated
    files: Optional[list[str]] = None  # streamed: the parts' files, concatenated
    size: int = 0
    workers: int = 0

    def batches(self, epoch_order: EpochOrder, steps_per_epoch: int, loop, d: Dist) -> Callable:
        """batches(step, micro) -> this rank's micro-batch (images, and is_forget when epoch_order gives it)."""
        if self.images is not None:
            images = stage(self.images, d)
            rows = RankRows(epoch_order, steps_per_epoch, loop.batch_size, loop.accum_steps, d, images.device)
            return HeldBatches(images, rows, d)
        rows = RankRows(epoch_order, steps_per_epoch, loop.batch_size, loop.accum_steps, d)
        return StreamedBatches(self.files, self.size, rows, d, self.workers)


def feed(parts: list, memory_mb: Optional[float] = None, workers: Optional[int] = None,
         skip_bad: bool = False, d: Dist = Dist()) -> Feed:
    """The concatenation of `parts` (ImageSets), held when its decoded images fit the budget, else
    streamed; the choice and its reason are printed. Unreadable files are named, or skipped with
    skip_bad, before either starts (d's ranks share the streamed sets' reading)."""
    check_memory_mb(memory_mb)
    check_workers(workers)
    if all(p.images is not None for p in parts):  # the digits: read already
        return Feed(parts, images=torch.cat([p.images for p in parts]))
    need = sum(data_lib.decoded_bytes(p) for p in parts)
    budget, why = memory_budget(memory_mb)
    count, size = sum(len(p) for p in parts), parts[0].size
    sized = f"{count:,} images at {size}² take {need / 2**20:,.1f} MB decoded; the budget is " \
            f"{budget / 2**20:,.1f} MB ({why})"
    if need <= budget:
        say(f"data: {sized}: held in memory")
        parts = [data_lib.decode(p, skip_bad) for p in parts]
        return Feed(parts, images=torch.cat([p.images for p in parts]))
    workers = default_workers() if workers is None else workers
    say(f"data: {sized}: streamed from disk by {workers} worker process{'es' * (workers != 1)} "
        f"(--data-workers), {PREFETCH} batches each ahead; every file is read once first, to name bad ones")
    parts = [data_lib.check(p, skip_bad, d.rank, d.world) for p in parts]
    return Feed(parts, files=[f for p in parts for f in p.files], size=size, workers=workers)
