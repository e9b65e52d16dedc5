"""What every launch helper shares."""
import functools
import os

import torch


def interpreting() -> bool:
    """Whether the kernels run under Triton's interpreter (on the CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot must take its operands as float32: the interpreter's bfloat16 tl.dot is wrong
    (triton 3.8: off by up to 2e10 on 16x16 tiles) where float32 and float16 are exact. The operands
    are bfloat16 values already, so in float32 the products are exactly what tensor cores multiply."""
    return dtype == torch.bfloat16 and interpreting()


def on_inputs_device(launch):
    """Runs launch(first, ...) with first's (or its first tensor's) CUDA device current: Triton launches on the current
    device and its stream, not the inputs', so inputs on cuda:1 under a current cuda:0 would run on
    the wrong GPU. On the CPU (the interpreter) it calls launch as it is."""
    @functools.wraps(launch)
    def on_device(first, *args, **kwargs):
        device = (first[0] if isinstance(first, (list, tuple)) else first).device  # a tensor or a list of them
        if device.type != "cuda":
            return launch(first, *args, **kwargs)
        with torch.cuda.device(device):
            return launch(first, *args, **kwargs)
    return on_device
