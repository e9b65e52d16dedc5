"""What every launch helper shares."""
import functools

import torch


def on_inputs_device(launch):
    """Runs launch(first, ...) with first's CUDA device current: Triton launches on the current
    device and its stream, not the inputs', so inputs on cuda:1 under a current cuda:0 would run on
    the wrong GPU. On the CPU (the interpreter) it calls launch as it is."""
    @functools.wraps(launch)
    def on_device(first, *args, **kwargs):
        if first.device.type != "cuda":
            return launch(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return launch(first, *args, **kwargs)
    return on_device
