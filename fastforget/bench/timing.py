"""Timing and ceilings measured in the same run: median times, copy bandwidth.

On CUDA, CUDA events around `reps` calls after warm-up (no host sync inside the timed loop); on
the CPU, perf_counter per call. Times are medians over repeats, in milliseconds.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10,
              min_time_s: float = 0.2) -> float:
    """Median wall time of fn() in ms; more reps (up to 100) while the total stays under min_time_s."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all < min_time_s and len(times) < 100):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int, device: torch.device) -> float:
    """GB/s of dst.copy_(src) for nbytes, counting bytes read plus bytes written."""
    src = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 0) -> float:
    """TFLOP/s of an n x n x n matmul in dtype (n: 8192 on CUDA, 1024 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median_ms(lambda: a @ b, device, reps=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12
