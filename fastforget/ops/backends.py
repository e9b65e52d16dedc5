"""Backends and dispatch, shared by every op (the xformers pattern).

A backend runs an op when it is available here (its toolchain built, its device present) and
supports the inputs (each op says what it refuses, and why). backend=None takes the first backend
of AUTO_ORDER for the inputs' device that accepts them; a name forces one, and so does
FASTFORGET_BACKEND for every op that has the backend it names.
When nothing fits, the error lists every backend tried with its reasons.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from .. import native
from ..errors import InvalidValue, UserError

BACKENDS = ("torch", "triton", "cuda", "cpu")

# Preference per device type, fastest first. The Triton interpreter is far too slow to be chosen
# on the CPU unasked; it stays reachable with backend="triton".
# TODO(gpu): order cuda/triton per op and shape from benchmarks/results once measured on the H200.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailable(UserError, RuntimeError):
    """No backend can run the op on these inputs (or on the one forced)."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    return None


def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run here at all, else why not."""
    if name == "torch":
        return None
    if name == "triton":
        if _triton_import_error():
            return _triton_import_error()
        if not (torch.cuda.is_available() or triton_interpret()):
            return "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on the CPU, slowly)"
        return None
    if name == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        return native.unavailable_reason("cuda")
    if name == "cpu":
        return native.unavailable_reason("cpu")
    raise InvalidValue(f"unknown backend {name!r}; expected one of {BACKENDS}")


def prepare(device: torch.device) -> None:
    """Builds (on first use) and loads the native extension that ops on `device` pick, so that a
    run does it before its first step rather than inside it; one that cannot build is left to
    the dispatcher, which reports why."""
    for name in AUTO_ORDER.get(device.type, ()):
        if name in native.EXTENSIONS:
            native.unavailable_reason(name)


def device_reasons(name: str, device: torch.device) -> list[str]:
    """Why backend `name` cannot take tensors on `device` (empty when it can)."""
    ok = {
        "torch": True,
        "cpu": device.type == "cpu",
        "cuda": device.type == "cuda",
        "triton": device.type == "cuda" or (device.type == "cpu" and triton_interpret()),
    }[name]
    if ok:
        return []
    if name == "triton" and device.type == "cpu":
        return ["inputs are on the CPU (set TRITON_INTERPRET=1 to interpret the Triton kernels there)"]
    return [f"inputs are on {device}, backend {name} runs on {'the CPU' if name == 'cpu' else 'CUDA devices'}"]


def requested_backend(backend: str | None, implemented: tuple[str, ...] = BACKENDS) -> str:
    """The forced backend ('' for automatic) from the argument or FASTFORGET_BACKEND, checked.

    `implemented`: the backends the op has. FASTFORGET_BACKEND forces every op that has the
    backend it names and leaves the others automatic (a model whose attention has no cuda kernel
    still runs under FASTFORGET_BACKEND=cuda); the argument forces, or fails with the reasons.
    """
    name = backend if backend is not None else os.environ.get("FASTFORGET_BACKEND", "")
    if name not in ("",) + BACKENDS:
        source = "backend" if backend is not None else "FASTFORGET_BACKEND"
        raise InvalidValue(f"{source} must be one of {BACKENDS} or None, got {name!r}")
    return name if backend is not None or name in implemented else ""


def standing_reasons(name: str, device: torch.device) -> list[str]:
    """Why backend `name` cannot run on `device` whatever the inputs (empty when it can): checked
    once per process and device type, since an op call must cost microseconds, not a probe."""
    return _standing_reasons(name, device.type, triton_interpret())


@functools.lru_cache(maxsize=None)
def _standing_reasons(name: str, device_type: str, interpret: bool) -> list[str]:
    why = unavailable_reason(name)
    return [why] if why else device_reasons(name, torch.device(device_type))


def select(op: str, requested: str, device: torch.device, reasons: Optional[Callable[[str], list[str]]] = None) -> str:
    """The backend that runs `op`: `requested` if given, else the first in AUTO_ORDER that fits.

    reasons(name) lists why backend `name` refuses these inputs (empty when it accepts them); an op
    whose backends take any inputs passes None, and its choice is made once per device type.
    """
    if reasons is None:
        return _select_for_device(op, requested, device.type, triton_interpret())
    return _choose(op, requested, device, reasons)


@functools.lru_cache(maxsize=None)
def _select_for_device(op: str, requested: str, device_type: str, interpret: bool) -> str:
    return _choose(op, requested, torch.device(device_type), lambda name: [])


def _choose(op: str, requested: str, device: torch.device, reasons: Callable[[str], list[str]]) -> str:
    names = (requested,) if requested else AUTO_ORDER.get(device.type, ("torch",))
    refused = {}
    for name in names:
        why = standing_reasons(name, device) or reasons(name)
        if not why:
            return name
        refused[name] = why
    lines = "\n".join(f"  {name}: {'; '.join(why)}" for name, why in refused.items())
    forced = f" (backend {requested!r} was forced)" if requested else ""
    raise BackendUnavailable(f"no fastforget backend can run {op} on these inputs{forced}:\n{lines}")
