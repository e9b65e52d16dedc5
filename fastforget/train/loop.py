"""The training loop both commands share: schedule, accumulation, clipping, DDP, logging,
atomic checkpoints and exact resumption.

Everything random in a step (masks, teacher noise) comes from a generator seeded by (seed, step,
micro-batch) and is drawn for the whole global batch, each rank using its rows; the data order is
a function of (seed, epoch). So a resumed run repeats the uninterrupted one exactly (bitwise on the
CPU), and N ranks compute what one process does with the same global batch. Numbers are read back
from the device only every log_every steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import Dist
from ..errors import Diverged, InvalidValue, UnreadableData
from ..families.base import Recipe
from ..ops import backends
from ..weights import load_weights, with_digest


# The optimizer settings a family's recipe supplies (families/base.py Recipe) when left None.
RECIPE = ("blr", "lr", "weight_decay", "betas", "schedule", "warmup_fraction", "clip_grad")
SCHEDULES = ("cosine", "constant")


@dataclass
class LoopConfig:
    out: str
    epochs: float = 1.0
    batch_size: int = 64  # per rank and micro-batch
    accum_steps: int = 1
    # The recipe: None takes the model family's (with_recipe), the reference's own.
    blr: Optional[float] = None  # lr = blr * global batch / 256
    lr: Optional[float] = None  # absolute; overrides blr
    min_lr: float = 0.0  # where the cosine schedule ends
    weight_decay: Optional[float] = None  # AdamW's, decoupled; none on biases, norms, embeddings
    betas: Optional[tuple] = None
    schedule: Optional[str] = None  # "cosine": warmup, then half a cosine to min_lr; "constant"
    warmup_fraction: Optional[float] = None
    clip_grad: Optional[float] = None  # gradient-norm clip; 0: none
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # steps; 0: at the end only
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this many steps: a time-boxed part
    resume: bool = False
    compile: bool = False  # the step's forward under torch.compile (the optimizer step is fused already)
    # torch.use_deterministic_algorithms for the run (fastforget's own kernels are deterministic
    # either way: no atomics); on the GPU this also pins cuBLAS's workspace and turns off cuDNN autotuning.
    deterministic: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in checkpoints and metrics

    def __post_init__(self):
        for name in ("batch_size", "accum_steps", "log_every"):
            require(self, name, is_count(getattr(self, name), 1), "an int >= 1")
        require(self, "save_every", is_count(self.save_every, 0), "an int >= 0 (0: at the end only)")
        require(self, "stop_after", self.stop_after is None or is_count(self.stop_after, 1), "None or an int >= 1")
        require(self, "epochs", is_real(self.epochs) and self.epochs > 0, "a finite number > 0")
        for name in ("blr", "lr", "min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            require(self, name, value is None or (is_real(value) and value >= 0), "a finite number >= 0")
        require(self, "warmup_fraction", self.warmup_fraction is None or
                (is_real(self.warmup_fraction) and 0 <= self.warmup_fraction < 1), "a number in [0, 1)")
        require(self, "betas", self.betas is None or (len(self.betas) == 2 and all(
            is_real(b) and 0 <= b < 1 for b in self.betas)), "two numbers in [0, 1)")
        require(self, "schedule", self.schedule is None or self.schedule in SCHEDULES, f"one of {SCHEDULES}")

    def with_recipe(self, recipe) -> "LoopConfig":
        """This config with its unset optimizer settings taken from recipe (a family's)."""
        return replace(self, **{name: getattr(recipe, name) for name in RECIPE if getattr(self, name) is None})

    def base_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.blr * global_batch / 256


def is_count(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def output_dir(path: str, flag: str = "--out") -> str:
    """path, made if needed; one that cannot be made (a file is in the way, no permission) is named."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise InvalidValue(f"{flag} {path!r} cannot be made a directory: {err.strerror or err}") from None
    return path


def require(config, name: str, ok: bool, expected: str) -> None:
    """A config's field check: the error names the field and its command-line flag."""
    if not ok:
        raise InvalidValue(f"{name} (--{name.replace('_', '-')}) must be {expected}, got {getattr(config, name)!r}")


def resolve_device(spec: Optional[str]) -> torch.device:
    """--device: 'cpu', 'cuda' or 'cuda:N' (None: CUDA when present), checked against this machine."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidValue(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValue(f"--device {spec}: this machine has no CUDA device (torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidValue(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def setup_distributed(device: Optional[str] = None) -> Dist:
    """torchrun's environment -> process group (nccl on GPUs, gloo on the CPU); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = resolve_device(device).type == "cuda"
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, dev)


def param_groups(named_params, weight_decay: float):
    """MAE's grouping: no weight decay on biases, norms (1-D) and the token/position embeddings."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith((".bias", "cls_token", "mask_token", "pos_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(trainable: nn.Module, weight_decay: float, lr: float,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """AdamW with MAE's groups (with weight decay 0 it is Adam), fused: one kernel for all
    parameters, not a loop of small ones."""
    return torch.optim.AdamW(param_groups(trainable.named_parameters(), weight_decay), lr=lr, betas=tuple(betas),
                             fused=True)


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[Tensor], clip_grad: Optional[float]) -> Tensor:
    """Clip (0 or None: not at all; the norm is returned either way, on the device), step, clear the
    gradients."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def learning_rate(step: int, total: int, base: float, min_lr: float, warmup: int, schedule: str = "cosine") -> float:
    """Linear warmup, then a half-cycle cosine down to min_lr (MAE's schedule, per step), or the
    base rate throughout (constant)."""
    if schedule == "constant":
        return base
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_atomic(obj: dict, path: str) -> None:
    """torch.save (with a digest of the content) to a temporary file, fsync, then rename: a kill
    leaves the old file whole, and damage to the new one is caught when it is loaded."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(with_digest(obj), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def step_generator(device: torch.device, seed: int, step: int, micro: int) -> torch.Generator:
    """The same on every rank: draws are made for the global batch and sliced per rank."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def run(cfg: LoopConfig, d: Dist, model: nn.Module, trainable: nn.Module, steps_per_epoch: int,
        batches: Callable[[int, int], tuple[Tensor, ...]],
        loss_fn: Callable[[tuple[Tensor, ...], torch.Generator, nn.Module], dict[str, Tensor]],
        checkpoint_extra: Callable[[], dict], on_start: Optional[Callable[[int], None]] = None,
        after_step: Optional[Callable[[float], None]] = None) -> dict:
    """Trains `trainable`'s parameters that require grad.

    batches(step, micro) -> this rank's micro-batch tensors; loss_fn(batch, generator, trainable as
    wrapped for DDP) -> dict with "loss" (to minimise) and other scalars to log. model's state dict
    is what checkpoints keep. on_start(the first step), when given, is called on rank 0 once the
    run is set to train (a resume accepted). after_step(lr), when given, runs after every
    optimizer step, on the device (unlearning's pull toward the original weights).
    Returns the last logged metrics.
    """
    cfg = cfg.with_recipe(Recipe())  # what the caller left unset: the default (MAE's) recipe
    with deterministic_algorithms(cfg.deterministic):
        return _run(cfg, d, model, trainable, steps_per_epoch, batches, loss_fn, checkpoint_extra, on_start,
                    after_step)


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """torch's deterministic mode inside the block when on (the previous settings come back after)."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn("deterministic: CUDA already ran in this process, so cuBLAS may keep its default "
                          "workspace; set CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting it")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # read when cuBLAS first runs
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# The loop's settings that fix a run's trajectory (with the global micro-batch and the unlearning or
# pretraining settings in checkpoint_extra()["settings"]): a run resumed with any of them changed
# would repeat neither run, so --resume refuses it. How often it logs or saves may change.
TRAJECTORY = ("epochs", "accum_steps", "blr", "lr", "min_lr", "weight_decay", "betas", "schedule", "warmup_fraction",
              "clip_grad", "seed")


def run_settings(cfg: LoopConfig, d: Dist, extra: dict) -> dict:
    settings = {name: getattr(cfg, name) for name in TRAJECTORY}
    settings["global_micro_batch"] = cfg.batch_size * d.world
    return json.loads(json.dumps({**settings, **extra.get("settings", {})}))  # tuples as lists, as saved


def _check_resumable(state: dict, now: dict, ckpt_path: str) -> None:
    saved = state.get("settings", {})
    changed = [f"{k} was {saved[k]!r}, now {v!r}" for k, v in now.items() if k in saved and saved[k] != v]
    if changed:
        raise InvalidValue(f"--resume: {ckpt_path} is from a run with other settings ({'; '.join(changed)}): "
                         f"the resumed run would repeat neither; resume with its settings, or start in another --out")


def _run(cfg, d, model, trainable, steps_per_epoch, batches, loss_fn, checkpoint_extra, on_start, after_step) -> dict:
    output_dir(cfg.out)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    if d.main:  # temporaries of saves that a kill interrupted: never read, safe to drop
        for name in os.listdir(cfg.out):
            if name.startswith("checkpoint.pt.tmp."):
                os.remove(os.path.join(cfg.out, name))
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    total = max(int(cfg.epochs * steps_per_epoch), 1)
    global_batch = cfg.batch_size * cfg.accum_steps * d.world
    base_lr = cfg.base_lr(global_batch)
    warmup = int(cfg.warmup_fraction * total)
    optimizer = make_optimizer(trainable, cfg.weight_decay, base_lr, cfg.betas)
    start = 0
    settings = run_settings(cfg, d, checkpoint_extra())
    if cfg.resume and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path)
        _check_resumable(state, settings, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    if on_start is not None and d.main:
        on_start(start)
    wrapped = trainable
    if d.world > 1:
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(trainable, device_ids=device_ids)
    params = [p for p in trainable.parameters() if p.requires_grad]
    loss_fn = torch.compile(loss_fn) if cfg.compile else loss_fn
    backends.prepare(d.device)  # a first native build is announced and done before the progress bar

    bar = _progress(total, start) if (d.main and cfg.progress) else None
    last: dict = {}
    sums: dict[str, Tensor] = {}
    counted = 0
    finite = torch.ones((), dtype=torch.bool, device=d.device)  # every loss and gradient norm so far, on the device
    saved = start
    t0 = time.perf_counter()
    end = total if cfg.stop_after is None else min(total, cfg.stop_after)
    for step in range(start, end):
        lr = learning_rate(step, total, base_lr, cfg.min_lr, warmup, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.accum_steps):
            try:
                batch = batches(step, micro)
            except UnreadableData as err:  # a streamed file gone bad: the last checkpoint stays as it was
                raise UnreadableData(f"{err}; stopped there, and {_kept(ckpt_path, saved)}") from None
            gen = step_generator(d.device, cfg.seed, step, micro)
            sync = micro == cfg.accum_steps - 1 or d.world == 1
            with wrapped.no_sync() if not sync else contextlib.nullcontext():
                out = loss_fn(batch, gen, wrapped)
                (out["loss"] / cfg.accum_steps).backward()
            for k, v in out.items():  # accumulate on the device: no host sync per step
                sums[k] = sums.get(k, 0) + v.detach().float()
            counted += 1
        grad_norm = optimizer_step(optimizer, params, cfg.clip_grad)
        if after_step is not None:
            after_step(lr)
        finite &= torch.isfinite(sums["loss"]) & torch.isfinite(grad_norm)
        done = step + 1
        logging = done % cfg.log_every == 0 or done == end  # and a part's last step (--stop-after)
        saving = bool(cfg.save_every and done % cfg.save_every == 0) or done == end  # rank 0 writes
        if logging or saving:  # host reads only here, on every rank alike
            _stop_unless_finite(finite, params if saving else [], d, done, saved, ckpt_path)
        if logging:
            values = _global_means(sums, counted, d)
            last = {"step": done, "epoch": done / steps_per_epoch, "lr": lr, "grad_norm": float(grad_norm),
                    **values, "seconds": time.perf_counter() - t0}
            sums, counted = {}, 0
            if d.main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
        if bar is not None:
            bar.update(1)
        if saving:
            if d.main:
                save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                             "loop": asdict(cfg), **checkpoint_extra(), "settings": settings}, ckpt_path)
            saved = done
    if bar is not None:
        bar.close()
    if d.world > 1:
        dist.barrier()
    return last


def _global_means(sums: dict[str, Tensor], counted: int, d: Dist) -> dict[str, float]:
    """Each logged value's mean over the micro-batches since the last log and over the ranks: the
    global batch's loss (exactly, for the reference normalisation, whose rank means are of equal
    batches), read back once, at a log step only."""
    stacked = torch.stack([sums[k] for k in sums]).double() / counted
    if d.world > 1:
        dist.all_reduce(stacked)
        stacked /= d.world
    return dict(zip(sums, stacked.tolist()))


def _stop_unless_finite(finite: Tensor, params: list[Tensor], d: Dist, done: int, saved: int, ckpt_path: str) -> None:
    """Raises on every rank when any rank saw a non-finite loss or gradient norm since the start, or
    (before a save) holds a non-finite parameter: a bad model is never written."""
    ok = finite.clone()
    if params:
        ok &= torch.isfinite(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach().float())
                                                                   for p in params])))
    ok = ok.to(torch.int32)
    if d.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not bool(ok):
        raise Diverged(
            f"stopped at step {done}: a loss, gradient norm or parameter became NaN or Inf after step {saved} "
            f"(check the learning rate and the inputs); no checkpoint since holds it: {_kept(ckpt_path, saved)}")


def _kept(ckpt_path: str, saved: int) -> str:
    """What a stopped run leaves: its last checkpoint, or none."""
    return f"the last checkpoint is {ckpt_path} (step {saved})" if os.path.exists(ckpt_path) else \
        "no checkpoint was written"


def load_checkpoint(path: str) -> dict:
    """A fastforget checkpoint, read with weights_only=True; damage or pickled code is a clear error."""
    state = load_weights(path, "checkpoint")
    for key in ("model", "optimizer", "step"):
        if not isinstance(state, dict) or key not in state:
            raise InvalidValue(f"checkpoint {path} lacks its {key!r} entry")
    return state


def _progress(total: int, start: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

