"""`fastforget info`: versions, the device, and every backend with available / why not."""
from __future__ import annotations

import platform

import torch

from . import __version__, native
from .ops import attention, backends


def report() -> str:
    forced = backends.requested_backend(None)  # an unknown FASTFORGET_BACKEND is an error that names it
    lines = [f"fastforget {__version__}", f"python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (interpreter: TRITON_INTERPRET=1)" if backends.triton_interpret() else ""))
    except ImportError:
        lines.append("triton not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
                     f"CUDA {torch.version.cuda}")
    else:
        lines.append(f"device: CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads; "
                     "no CUDA device")
    lines.append(f"CUDA toolkit: {native.cuda_home() or 'not found'}")
    lines.append("backends:" + (f" (FASTFORGET_BACKEND={forced} forces it on every op that has it)" if forced else ""))
    for name in backends.BACKENDS:
        why = backends.unavailable_reason(name)
        lines.append(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    why = native.unavailable_reason("cuda") if not torch.cuda.is_available() else None
    if not torch.cuda.is_available():
        lines.append(f"  (cuda extension build: {'ok' if why is None else why})")
    lines.append("ops: unlearn_loss, masked_patch_embed, make_teacher_batch on every backend; qkv_attention on cpu "
                 f"(up to {attention.CPU_MAX_TOKENS} tokens) and torch (scaled_dot_product_attention: the GPU path)")
    return "\n".join(lines)
