"""Timing and ceilings measured in the same run: median times, copy bandwidth, matmul rate.

Times are medians over samples, in milliseconds per call. On the CPU a sample is one call timed
with perf_counter. On CUDA a sample is a burst of back-to-back calls between two CUDA events, with
no host sync inside, sized to about BURST_MS:
- by default the time per call is what a training loop gets: the slower of the host's launches and
  the GPU's work (bench step);
- with gpu_only, each burst waits behind a GPU sleep long enough for the host to queue all of it,
  so the time is the GPU's alone, what a kernel is judged by against its roofline (bench ops): an
  18 us kernel behind 50 us of Python dispatch would otherwise time the dispatch. Back-to-back
  calls reuse their inputs, so a shape that fits the L2 cache (60 MB on an H200) reads from it;
  the copy ceiling is measured far past it (COPY_MIN_BYTES), so such a shape can pass 100%.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

BURST_MS = 1.0  # a CUDA sample's length: enough calls that the events' own cost is lost in it
MAX_BURST = 64  # calls per CUDA sample at most (the launch queue holds about a thousand kernels)
SLEEP_CYCLES_PER_MS = 3e6  # GPU clock cycles per ms of host time to cover: 2 GHz, with half again to spare
MAX_SLEEP_MS = 100  # a burst whose host time is longer than this is the host's to time anyway


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10,
              min_time_s: float = 0.2, gpu_only: bool = False) -> float:
    """Median ms per call of fn() over `reps` samples, more (up to 100) while the total stays
    under min_time_s; gpu_only: the GPU's time without the host's (CUDA; see the module)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        host_ms, call_ms = _probe(fn)
        calls = max(1, min(MAX_BURST, round(BURST_MS / max(call_ms, 1e-3))))
        sleep_cycles = int(SLEEP_CYCLES_PER_MS * min(host_ms * calls, MAX_SLEEP_MS)) if gpu_only else 0
        sample = lambda: _cuda_burst(fn, calls, sleep_cycles)  # noqa: E731
    else:
        sample = lambda: _cpu_call(fn)  # noqa: E731
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all < min_time_s and len(times) < 100):
        times.append(sample())
    return statistics.median(times)


def _cpu_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _probe(fn) -> tuple[float, float]:
    """(host ms to queue one call, ms per call from an idle GPU)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    fn()
    host_ms = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return host_ms, start.elapsed_time(end)


def _cuda_burst(fn, calls: int, sleep_cycles: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if sleep_cycles:
        torch.cuda._sleep(sleep_cycles)  # the GPU waits here while the host queues the burst
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


COPY_MIN_BYTES = 1 << 30  # on CUDA: the memory's bandwidth, not the L2's


def copy_bandwidth_gbs(nbytes: int, device: torch.device) -> float:
    """GB/s of dst.copy_(src) for nbytes (at least COPY_MIN_BYTES on CUDA), counting bytes read
    plus bytes written."""
    nbytes = max(nbytes, COPY_MIN_BYTES) if device.type == "cuda" else nbytes
    src = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, gpu_only=True)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 0) -> float:
    """TFLOP/s of an n x n x n matmul in dtype (n: 8192 on CUDA, 1024 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median_ms(lambda: a @ b, device, reps=5, gpu_only=True)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# -- paired rounds: ratios that a wandering machine does not move ------------------------------

ROUNDS, MAX_ROUNDS = 5, 15  # timing rounds at least and at most
SETTLED = 0.20  # a ratio whose rounds spread more than this (interquartile range over median) is unsettled


@dataclass
class Paired:
    """One provider over paired rounds: in each round every provider is timed back to back, so
    drift of the machine's speed (a shared VM's wanders by 30% within a minute) cancels in the
    ratio of two providers of the same round."""
    ms: float  # the median of its rounds' times
    ratio: float  # the median over rounds of baseline's time / its time in the same round
    spread: float  # the interquartile range of those per-round ratios over their median
    rounds: list[float]  # each round's time

    @property
    def settled(self) -> bool:
        return self.spread <= SETTLED


def paired_rounds(samples: dict[str, Callable[[], float]], baseline: str, time_cap_s: float = 60.0,
                  rounds: int = ROUNDS, max_rounds: int = MAX_ROUNDS) -> dict[str, Paired]:
    """samples: provider -> a function that times it once (ms). Runs `rounds` rounds, then more,
    up to max_rounds or time_cap_s, while any ratio is unsettled."""
    times: dict[str, list[float]] = {name: [] for name in samples}
    start = time.perf_counter()
    while True:
        for name, sample in samples.items():
            times[name].append(sample())
        result = _paired(times, baseline)
        done = len(times[baseline]) >= rounds and all(p.settled for p in result.values())
        if done or len(times[baseline]) >= max_rounds or time.perf_counter() - start > time_cap_s:
            return result


def _paired(times: dict[str, list[float]], baseline: str) -> dict[str, Paired]:
    out = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(times[baseline], ts)]
        q1, mid, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        out[name] = Paired(statistics.median(ts), mid, (q3 - q1) / mid, list(ts))
    return out


def unsettled_note(result: dict[str, Paired]) -> str:
    """'' when every ratio settled, else a line that says which did not, for the table."""
    loose = {name: p for name, p in result.items() if not p.settled}
    if not loose:
        return ""
    worst = ", ".join(f"{name} {100 * p.spread:.0f}%" for name, p in loose.items())
    return (f"unsettled: the rounds' ratios spread more than {100 * SETTLED:.0f}% ({worst}) after "
            f"{len(next(iter(result.values())).rounds)} rounds: the machine is busy or its speed wanders")
