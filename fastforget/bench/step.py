"""`fastforget bench step`: one whole unlearning step, three ways, on the same model, data and device.

Providers, for a model of any family:
- reference: the family's reference code's step, re-created (fastforget/bench/steps/<family>.py);
- pytorch: that step as good plain PyTorch: bf16 autocast (CUDA), fused optimizer, no per-step
  host reads, no fastforget op;
- fastforget: the trainer's own step (train.unlearn.unlearning_step and loop.optimizer_step): one
  routed teacher pass (bf16 weights on CUDA), the fused ops, the fused optimizer.
On the CPU there is no autocast for any provider (bf16 autocast is slower than float32 there).
`--compile` adds each provider again with its forward under torch.compile.

Each provider runs in a fresh process of its own; the providers take turns in timing rounds (see
run). Peak memory: the most bytes allocated at once, model,
teacher, optimizer state and activations (CUDA's allocator statistics; on the CPU, the profiler's
allocator events over building and two steps, in a process of its own). FLOPs are the
method's (student forward and backward, one teacher forward), the same count for every provider,
so model FLOP utilisation (MFU) compares like with like, against the matmul rate measured in the
same run.
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import multiprocessing
import os
import shutil
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import families
from ..errors import InvalidValue
from ..train.loop import Dist, make_optimizer, optimizer_step, step_generator
from ..train.unlearn import UnlearnConfig, unlearning_step
from . import harness, plot, steps
from .steps import LR
from .timing import ROUNDS, matmul_tflops, median_ms, paired_rounds, sync, unsettled_note

PROVIDERS = ("reference", "pytorch", "fastforget")
CSV_COLUMNS = ("provider", "model", "batch", "device", "ms_per_step", "images_per_s", "speedup", "spread",
               "peak_mem_mb", "mfu", "commit", "date")


@dataclass(frozen=True)
class Spec:
    provider: str
    model: str
    batch: int
    mask_ratio: Optional[float]  # MAE's; None for families without masks
    device: str
    compiled: bool = False
    reps: int = 10
    min_time_s: float = 3.0  # medians over many steps: a 2-core machine's times wander

    @property
    def name(self) -> str:
        return self.provider + ("+compile" if self.compiled else "")


# -- the trainer's own step ----------------------------------------------------------------------

def _fastforget_step(spec: Spec, model, imgs: Tensor, is_forget: Tensor):
    d = Dist(device=imgs.device)
    family = families.of(model)
    cfg = UnlearnConfig(checkpoint="", **steps.of(family.name).options(spec)).for_family(family)
    module, loss_fn = unlearning_step(cfg, model, d)
    optimizer = make_optimizer(module, cfg.loop.weight_decay, LR, cfg.loop.betas)
    params = [p for p in module.parameters() if p.requires_grad]
    forward = torch.compile(loss_fn) if spec.compiled else loss_fn
    counter = iter(range(1 << 62))

    def step():
        out = forward((imgs, is_forget), step_generator(d.device, 0, next(counter), 0), module)
        out["loss"].backward()
        optimizer_step(optimizer, params, cfg.loop.clip_grad)
    return step


def build(spec: Spec):
    """(model, step) for spec: a fresh model of spec.model on its device and one provider's step
    on a batch of random images, every other row a forget row."""
    device = torch.device(spec.device)
    torch.manual_seed(0)
    family = families.of_model(spec.model)
    model = family.create(spec.model).to(device)
    chans, size = family.image_shape(model)
    imgs = torch.rand(spec.batch, chans, size, size, device=device)
    is_forget = torch.arange(spec.batch, device=device) % 2 == 0
    if spec.provider == "fastforget":
        return model, _fastforget_step(spec, model, imgs, is_forget)
    return model, steps.of(family.name).baseline_step(spec, model, imgs, is_forget, plain=spec.provider == "pytorch")


def _built(spec: Spec):
    """(step, info): spec's step, built and warmed, with its FLOPs and, on CUDA, its peak memory."""
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, step = build(spec)
    for _ in range(3):
        step()
    sync(device)
    info = {"flops": steps.of(families.of(model).name).flops(model, spec)}
    if device.type == "cuda":
        info["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return step, info


def _cpu_peak_mb(spec: Spec) -> float:
    """The CPU peak of building spec and two steps (call it in a process of its own: after the
    profiler has run, its process's ops run 10-15% off, faster or slower by provider)."""
    with cpu_allocations() as peak_of:
        _, step = build(spec)
        for _ in range(2):
            step()
    return peak_of() / 2**20


PROFILED_STEPS = 2


def _profiler():
    """torch.profiler, with Kineto's own log lines off on a machine without CUDA (its "profiler_start"
    and "gpuGetDeviceCount failed" lines say nothing there, and read like a failure); read by
    Kineto when it first starts, and a user's KINETO_LOG_LEVEL wins."""
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch import profiler

    return profiler


def profile_steps(step, device: torch.device, path: str) -> str:
    """Profiles PROFILED_STEPS steps: path.txt, the ops with the most self time on the device (the
    CPU without one), and path.json.gz, a Chrome/Perfetto trace that shows launch gaps. Returns
    path.txt."""
    profiler = _profiler()
    cuda = device.type == "cuda"
    activities = [profiler.ProfilerActivity.CPU] + ([profiler.ProfilerActivity.CUDA] if cuda else [])
    with profiler.profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(path + ".json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(path + ".txt", "w") as f:
        f.write(f"{PROFILED_STEPS} steps, sorted by {sort}\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60) + "\n")
    return path + ".txt"


def _serve(spec: Spec, conn) -> None:
    """One provider's process: builds its step, sends its info (or the error), then answers
    requests until asked None: a number of seconds, by timing steps for that long (median ms per
    step); a path, by profiling steps into it (profile_steps)."""
    try:
        step, info = _built(spec)
    except Exception:  # any: the parent raises it, naming the provider
        conn.send({"error": traceback.format_exc()})
        return
    conn.send(info)
    device = torch.device(spec.device)
    reps = max(2, spec.reps // ROUNDS)
    while (request := conn.recv()) is not None:
        if isinstance(request, str):
            try:
                conn.send(profile_steps(step, device, request))
            except Exception:  # any: the timings are out already; the parent reports it
                conn.send({"error": traceback.format_exc()})
        else:
            conn.send(median_ms(step, device, warmup=1, reps=reps, min_time_s=request))


@contextlib.contextmanager
def cpu_allocations():
    """Yields peak() -> the most CPU bytes allocated at once inside the block (model, optimizer
    state, activations), from the profiler's allocator events: CPU tensors have no allocator stats."""
    profiler = _profiler()
    peak = [0]
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        yield lambda: peak[0]
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    peak[0] = max((e["args"]["Total Allocated"] for e in events
                   if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), default=0)


def _reply(spec: Spec, process, conn):
    """A provider process's next message; its death is an error that names the provider."""
    try:
        return conn.recv()
    except EOFError:
        process.join(timeout=10)
        raise RuntimeError(f"bench step: provider {spec.name}'s process died (exit code {process.exitcode})") from None


def run(specs: list[Spec], timed: Optional[Callable[[list[dict], str], None]] = None,
        profile_dir: Optional[str] = None) -> list[dict]:
    """Each spec built in a fresh spawned process of its own, then timed in paired rounds where the
    providers take turns (timing.paired_rounds): a machine whose speed wanders during the run (a
    shared 2-core VM does) slows every provider of a round alike, so a provider's speedup is the
    median of its rounds' ratios to the reference, and more rounds are taken while those spread
    more than 20%. timed(the results, a note on unsettled rounds or '') is called as soon as they
    are in; then, with profile_dir, each provider is profiled
    into profile_dir/<name> (after the timing, which the profiler would disturb, and after the
    results are out, so a time limit or a profiler failure cannot cost them)."""
    context = multiprocessing.get_context("spawn")
    cpu_peaks = {}
    for spec in specs:
        if torch.device(spec.device).type == "cpu":
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                cpu_peaks[spec] = pool.submit(_cpu_peak_mb, spec).result()
    workers = []
    try:
        for spec in specs:
            conn, child = context.Pipe()
            process = context.Process(target=_serve, args=(spec, child), daemon=True)
            process.start()
            info = _reply(spec, process, conn)
            workers.append((spec, process, conn, info))
            if "error" in info:
                raise RuntimeError(f"bench step: provider {spec.name} failed to build:\n{info['error']}")
        def sample(spec, process, conn) -> float:  # one round's turn: its median ms/step
            conn.send(spec.min_time_s / ROUNDS)
            return _reply(spec, process, conn)

        names = [spec.name for spec, *_ in workers]
        paired = paired_rounds({spec.name: (lambda w=(spec, process, conn): sample(*w))
                                for spec, process, conn, _ in workers},
                               baseline="reference" if "reference" in names else names[0],
                               time_cap_s=6 * sum(spec.min_time_s for spec in specs))
        results = [{"spec": spec, "ms": paired[spec.name].ms, "speedup": paired[spec.name].ratio,
                    "spread": paired[spec.name].spread, "rounds": paired[spec.name].rounds,
                    "peak_mb": cpu_peaks.get(spec), **info} for spec, _, _, info in workers]
        note = unsettled_note(paired)
        if timed:
            timed(results, note)
        if profile_dir:
            os.makedirs(profile_dir, exist_ok=True)
            for spec, process, conn, _ in workers:
                conn.send(os.path.join(os.path.abspath(profile_dir), spec.name))
                reply = _reply(spec, process, conn)
                failed = isinstance(reply, dict)
                print(f"profile of {spec.name}: " + (f"failed:\n{reply['error']}" if failed else reply))
    finally:
        for _, process, conn, _ in workers:
            if process.is_alive():
                conn.send(None)
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return results


def rows(results: list[dict], matmul_rate: float, commit: str) -> list[dict]:
    date = datetime.date.today().isoformat()
    out = []
    for r in results:
        s = r["spec"]
        out.append({"provider": s.name, "model": s.model, "batch": s.batch, "device": s.device,
                    "ms_per_step": r["ms"], "images_per_s": s.batch / (r["ms"] * 1e-3), "speedup": r["speedup"],
                    "spread": r["spread"], "peak_mem_mb": r["peak_mb"],
                    "mfu": r["flops"] / (r["ms"] * 1e-3) / (matmul_rate * 1e12),
                    "commit": commit, "date": date, "rounds": r["rounds"]})
    return out


def format_table(title: str, table: list[dict], note: str = "") -> str:
    """The table: speedup is the median of the rounds' paired ratios to the reference, spread their
    interquartile range over it; `rounds` is the range of the rounds' own medians (ms/step), how
    much the machine wandered while this provider was timed."""
    lines = [title, f"{'provider':<20} {'ms/step':>9} {'images/s':>9} {'speedup':>8} {'spread':>7} {'peak MB':>9} "
                    f"{'MFU':>6} {'rounds':>15}"]
    for r in table:
        lines.append(f"{r['provider']:<20} {r['ms_per_step']:9.2f} {r['images_per_s']:9.1f} {r['speedup']:7.2f}x "
                     f"{100 * r['spread']:6.0f}% {r['peak_mem_mb']:9.1f} {100 * r['mfu']:5.1f}% "
                     f"{min(r['rounds']):7.2f}-{max(r['rounds']):.2f}")
    return "\n".join(lines + ([note] if note else []))


def append_csv(path: str, table: list[dict]) -> None:
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write(",".join(CSV_COLUMNS) + "\n")
        for r in table:
            f.write(",".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in CSV_COLUMNS) + "\n")


def draw(csv_path: str) -> str:
    """csv_path's images/s as bars, one group per (model, batch, device), the latest row of each
    provider; written beside the CSV as a PNG."""
    import csv

    groups: dict[str, dict[str, float]] = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            label = f"{r['model']} B={r['batch']} {r['device']}"
            groups.setdefault(label, {})[r["provider"]] = float(r["images_per_s"])
    path = os.path.splitext(csv_path)[0] + ".png"
    plot.bars(groups, "fastforget bench step: images per second (higher is better)", "images/s", path)
    return path


def main(args) -> int:
    device = str(harness.device_of(args))
    harness.csv_folder(args.csv)
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise InvalidValue(f"--providers: unknown {unknown}; expected a comma-separated subset of {PROVIDERS}")
    try:
        family = families.of_model(args.model)
    except InvalidValue as err:
        raise InvalidValue(f"--model: {err}") from None
    mask_ratio = family.check_option("mask_ratio", args.mask_ratio)
    specs = [Spec(p, args.model, args.batch_size, mask_ratio, device, c, args.reps, args.min_time)
             for c in ([False, True] if args.compile else [False]) for p in providers]
    def report(results: list[dict], note: str) -> None:
        dev = torch.device(device)
        rate = matmul_tflops(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        table = rows(results, rate, harness.commit())
        masks = f", mask {mask_ratio}" if mask_ratio is not None else ""
        print(format_table(f"unlearning step, {args.model}, batch {args.batch_size}{masks} on "
                           f"{device}; matmul rate {rate:.2f} TFLOP/s, threads {torch.get_num_threads()}", table,
                           note), flush=True)
        if args.csv:
            append_csv(args.csv, table)
            print(f"wrote {args.csv} and {draw(args.csv)}", flush=True)

    run(specs, report, args.profile)
    if args.profile:
        print(f"profiles of {PROFILED_STEPS} steps per provider: {args.profile}/<provider>.txt and .json.gz")
    return 0
