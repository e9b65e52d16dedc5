"""Shared test set-up: which (backend, device) pairs run here, and the GPU marker.

Without a CUDA device the Triton kernels run under TRITON_INTERPRET=1, which must be set before
triton.jit wraps them, so it is set here, before fastforget is imported.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastforget.ops import backends  # noqa: E402

# float32 references stay float32 on the GPU: cuDNN's convolutions default to TF32, which the
# fastforget kernels (and the tolerances) do not use. The old flag: torch refuses mixing the two APIs.
torch.backends.cudnn.allow_tf32 = False


def backend_params():
    """pytest params of every backend with the device it runs on; CUDA ones marked gpu."""
    params = []
    for device in ("cpu", "cuda"):
        for name in backends.BACKENDS:
            if backends.device_reasons(name, torch.device(device)):
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def one_and_two_ranks(args: list, batch: int, out):
    """`fastforget ARGS` as one process with batch 2 * `batch`, then under torchrun as 2 CPU ranks
    of `batch` each, into out/one and out/two: (the two checkpoints, their metrics.jsonl lines,
    the two runs' stdout)."""
    import json
    import subprocess
    import sys

    from fastforget.train.loop import load_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = {"one": [sys.executable, "-m", "fastforget.cli"],
              "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "-m", "fastforget.cli"]}
    stdout = []
    for run, per_rank in (("one", 2 * batch), ("two", batch)):
        proc = subprocess.run([*launch[run], *args, "--batch-size", str(per_rank), "--out", str(out / run)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stdout.append(proc.stdout)
    checkpoints = [load_checkpoint(str(out / run / "checkpoint.pt")) for run in ("one", "two")]
    logs = [[json.loads(line) for line in open(out / run / "metrics.jsonl")] for run in ("one", "two")]
    return checkpoints, logs, stdout


def image_folder(root, classes=("cat", "dog"), per_class=3, size=12, ext="png"):
    """An ImageFolder of random RGB images, per_class of each class, as root/<class>/<i>.<ext>."""
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.{ext}")
    return root


RGB_MAE = {"in_chans": 3, "pixel_mean": (0.5,) * 3, "pixel_std": (0.5,) * 3}


def rgb_mae_checkpoint(tmp_path) -> str:
    """An RGB mae_vit_tiny checkpoint, as the trainer writes them."""
    from fastforget.models import create_mae
    from fastforget.train.loop import save_atomic

    ckpt = str(tmp_path / "original.pt")
    save_atomic({"model": create_mae("mae_vit_tiny", **RGB_MAE).state_dict(), "optimizer": {}, "step": 0,
                 "config": {"model": "mae_vit_tiny", "overrides": RGB_MAE}}, ckpt)
    return ckpt
