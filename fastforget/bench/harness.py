"""What every `fastforget bench` op shares: providers timed side by side in one run, a table
that puts each against the eager reference and against a ceiling measured in the same run, and
CSV rows for results/."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..ops import backends
from .timing import ROUNDS, median_ms, paired_rounds, sync, unsettled_note

Provider = Union[Callable[[], object], str]  # a step to time, or why it is skipped


@dataclass
class Row:
    provider: str
    ms: float = float("nan")
    rate: float = float("nan")  # GB/s or TFLOP/s of the work the op must do
    vs_eager: float = float("nan")  # the median of the rounds' paired ratios
    spread: float = float("nan")  # of those ratios: interquartile range / median
    note: str = ""


def backend_providers(device: torch.device, step_for: Callable[[str], Callable[[], object]]) -> dict[str, Provider]:
    """Each fastforget backend: its step, or the reason it does not run here."""
    found: dict[str, Provider] = {}
    for name in backends.BACKENDS:
        why = backends.unavailable_reason(name) or "; ".join(backends.device_reasons(name, device))
        if name == "triton" and device.type == "cpu":
            why = why or "the Triton interpreter is a correctness tool, not timed"
        found[name] = why or step_for(name)
    return found


def run(providers: dict[str, Provider], device: torch.device, work: float, reps: int = 10) -> tuple[list[Row], str]:
    """Times each provider in paired rounds against the first (eager): on CUDA the GPU's time
    alone, the host's dispatch hidden, which is what the roofline judges. rate = work / time (work
    in GB or TFLOP). Returns the rows and a note, '' unless the rounds did not settle."""
    runnable = {name: step for name, step in providers.items() if not isinstance(step, str)}
    for step in runnable.values():  # compiles, allocator pools, caches: before any round
        for _ in range(3):
            step()
    sync(device)
    per_round = max(2, reps // ROUNDS)
    result = paired_rounds({name: (lambda step=step: median_ms(step, device, warmup=0, reps=per_round,
                                                                 min_time_s=0.04, gpu_only=True))
                            for name, step in runnable.items()}, baseline=next(iter(runnable)))
    rows = []
    for name, step in providers.items():
        if isinstance(step, str):
            rows.append(Row(name, note=f"skipped: {step}"))
            continue
        p = result[name]
        rows.append(Row(name, p.ms, work / (p.ms * 1e-3), p.ratio, p.spread))
    return rows, unsettled_note(result)


@dataclass
class Measured:
    """One op at one shape and dtype: every provider's row, against a ceiling of the same run."""
    op: str
    title: str
    shape: str
    dtype: str
    device: str
    rows: list[Row]
    unit: str  # GB/s or TFLOP/s
    ceiling: float
    ceiling_name: str  # copy bandwidth or matmul rate
    note: str = ""  # the rounds did not settle

    def table(self) -> str:
        lines = [f"{self.title}; {self.ceiling_name} {self.ceiling:.1f} {self.unit}, threads {torch.get_num_threads()}",
                 f"{'provider':<10} {'ms':>9} {self.unit:>8} {'% ceil':>7} {'vs eager':>9} {'spread':>7}"]
        for r in self.rows:
            if r.note:
                lines.append(f"{r.provider:<10} {r.note}")
            else:
                lines.append(f"{r.provider:<10} {r.ms:9.3f} {r.rate:8.2f} {100 * r.rate / self.ceiling:6.0f}% "
                             f"{r.vs_eager:8.2f}x {100 * r.spread:6.0f}%")
        return "\n".join(lines + ([self.note] if self.note else []))

    def append_csv(self, path: str) -> None:
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write("op,provider,shape,dtype,device,ms,rate,unit,ceiling,vs_eager,spread\n")
            for r in self.rows:
                if not r.note:
                    f.write(f"{self.op},{r.provider},{self.shape},{self.dtype},{self.device},{r.ms:.4f},{r.rate:.3f},"
                            f"{self.unit},{self.ceiling:.3f},{r.vs_eager:.3f},{r.spread:.3f}\n")


def measured(op: str, what: str, shape: str, dtype: torch.dtype, device: torch.device, timed: tuple[list[Row], str],
             unit: str, ceiling: float, ceiling_name: str) -> Measured:
    """A Measured titled "<what>, <shape> <dtype> on <device>" of run()'s rows and note; the CSV's
    shape has no spaces."""
    name = str(dtype).removeprefix("torch.")
    rows, note = timed
    return Measured(op, f"{what}, {shape} {name} on {device}", shape.replace(" ", ";"), name, str(device), rows, unit,
                    ceiling, ceiling_name, note)


def csv_folder(path):
    """--csv's folder, made before any timing (a path that cannot take the file is named now, not
    after the run)."""
    if path:
        from ..train.loop import output_dir
        output_dir(os.path.dirname(os.path.abspath(path)), "--csv's folder")


def device_of(args) -> torch.device:
    """--device, or CUDA when present."""
    from ..train.loop import resolve_device

    return resolve_device(args.device)


def report(measured: Measured, csv: Optional[str]) -> int:
    """What each `fastforget bench <op>` ends with: the table, and the CSV rows when asked."""
    print(measured.table())
    if csv:
        measured.append_csv(csv)
    return 0


def commit() -> str:
    """FASTFORGET_COMMIT, else the source's git commit (short), else the package version."""
    if os.environ.get("FASTFORGET_COMMIT"):
        return os.environ["FASTFORGET_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from .. import __version__
        return f"v{__version__}"
