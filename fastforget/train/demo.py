"""`fastforget demo` (`make demo`): the main job on the embedded digits, end to end.

Pretrains mae_vit_tiny on all ten digits (cached in DIR/original), unlearns the forget digits with
the real retain digits ("ours") and with proxy digits instead ("ours_proxy"), then evaluates the
models on the test images: reconstruction MSE of the removed patches at mask ratio 0.75, in
[0, 1] pixel space. Writes DIR/report.json and DIR/reconstructions.png.

With baselines, the reference's four baselines train too (same data, steps and learning rate as
ours), and all seven models are evaluated with the paper's metrics on inpainting and outpainting
(fastforget eval, digits features): the CSVs, report.json's "tasks" and DIR/results.md.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import load_mae
from . import data as data_lib
from .loop import LoopConfig, output_dir
from .unlearn import PretrainConfig, UnlearnConfig, pretrain, unlearn

FORGET, RETAIN, PROXY = ("0", "1"), ("2", "3", "4", "5"), ("6", "7", "8", "9")
BASELINES = ("max-loss", "noisy-label", "retain-label", "random-encoder")


@dataclass
class DemoConfig:
    out: str = "demo-out"
    # Chosen on the training images' losses and reconstructions, never on the test split.
    pretrain_epochs: float = 80
    unlearn_epochs: float = 200
    unlearn_blr: float = 2e-2
    batch_size: int = 128
    seed: int = 0
    mask_ratio: float = 0.75
    baselines: bool = False


@torch.no_grad()
def masked_reconstruction(model, images: Tensor, mask_ratio: float, seed: int) -> tuple[Tensor, Tensor]:
    """(reconstruction in [0, 1], mask (B, L)) with masks drawn from seed: the same for every model."""
    noise = torch.rand(images.shape[0], model.num_patches, generator=torch.Generator().manual_seed(seed))
    latent, mask, ids_restore = model.forward_encoder(images, mask_ratio, noise)
    return model.reconstruct(model.forward_decoder(latent, ids_restore)).clamp(0, 1), mask


def removed_patch_mse(model, images: Tensor, mask_ratio: float, seed: int) -> float:
    recon, mask = masked_reconstruction(model, images, mask_ratio, seed)
    per_patch = ((model.patchify(recon) - model.patchify(images)) ** 2).mean(-1)
    return float((per_patch * mask).sum() / mask.sum())


def _kept_pixels(model, images: Tensor, mask: Tensor) -> Tensor:
    """1 on the pixels of kept patches, 0 on removed ones, (B, C, H, W)."""
    return model.unpatchify((1 - mask)[..., None].expand(-1, -1, model.patchify(images).shape[-1]))


def ensure_original(cfg: DemoConfig) -> str:
    """DIR/original/checkpoint.pt: mae_vit_tiny pretrained on all ten digits, made once and reused."""
    path = os.path.join(cfg.out, "original", "checkpoint.pt")
    if os.path.exists(path):
        print(f"reusing the pretrained model in {path}")
        return path
    print(f"pretraining mae_vit_tiny on the digits ({cfg.pretrain_epochs:g} epochs, random and task-shaped masks)")
    pretrain(PretrainConfig(device="cpu", task_masks=True, loop=LoopConfig(
        out=os.path.dirname(path), epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size, blr=1.5e-3,
        seed=cfg.seed, log_every=50)))
    return path


def test_sets() -> dict:
    """The test images of the forget and retain digits."""
    test = data_lib.load_digits("test", 16)
    return {s: test.subset(torch.isin(test.labels, torch.tensor([int(c) for c in classes])).nonzero()[:, 0])
            for s, classes in (("forget", FORGET), ("retain", RETAIN))}


def run(cfg: DemoConfig) -> dict:
    t0 = time.perf_counter()
    output_dir(cfg.out)
    original_ckpt = ensure_original(cfg)
    runs = {"ours": dict(retain_classes=RETAIN), "ours_proxy": dict(proxy_classes=PROXY)}
    if cfg.baselines:
        runs.update({m: dict(retain_classes=RETAIN, method=m) for m in BASELINES})
    for name, classes in runs.items():
        print(f"unlearning digits {', '.join(FORGET)} ({name}, {cfg.unlearn_epochs:g} epochs)")
        unlearn(UnlearnConfig(checkpoint=original_ckpt, forget_classes=FORGET, device="cpu", **classes,
                              loop=LoopConfig(out=os.path.join(cfg.out, name), epochs=cfg.unlearn_epochs,
                                              batch_size=cfg.batch_size, blr=cfg.unlearn_blr, seed=cfg.seed,
                                              log_every=50)))

    sets = test_sets()
    models = {"original": load_mae(original_ckpt)}
    models.update({name: load_mae(os.path.join(cfg.out, name, "checkpoint.pt")) for name in runs})
    report = {"forget_classes": list(FORGET), "retain_classes": list(RETAIN), "proxy_classes": list(PROXY),
              "mask_ratio": cfg.mask_ratio, "models": {}}
    for name, model in models.items():
        model.eval()
        report["models"][name] = {
            split: {"mse": removed_patch_mse(model, s.images, cfg.mask_ratio, cfg.seed + 1)} for split, s in sets.items()}
    _save_grid(models, sets, cfg)
    print(format_report(report))
    if cfg.baselines:
        from ..eval.features import extractor
        from ..eval.run import evaluate, markdown

        report["tasks"] = evaluate(models, sets, extractor("digits"), ("inpaint", "outpaint"), 0.5, cfg.out)
        print(markdown(report["tasks"]))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def format_report(report: dict) -> str:
    base = report["models"]["original"]
    lines = [f"{'model':<12} {'forget MSE':>11} {'vs original':>12} {'retain MSE':>11} {'vs original':>12}"]
    for name, m in report["models"].items():
        f, r = m["forget"]["mse"], m["retain"]["mse"]
        lines.append(f"{name:<12} {f:11.4f} {f / base['forget']['mse']:11.2f}x {r:11.4f} "
                     f"{100 * (r / base['retain']['mse'] - 1):+11.1f}%")
    return "\n".join(lines)


def _save_grid(models, sets, cfg: DemoConfig, per_set: int = 6) -> None:
    """Rows: originals, masked inputs (removed patches grey), then each model's reconstruction of
    the removed patches pasted into the kept ones, as MAE shows them; forget then retain columns,
    each row and group named on the image."""
    from ..eval.pictures import save_grid

    images = torch.cat([s.images[:per_set] for s in sets.values()])
    rows = [("ground truth", images)]
    for name, model in models.items():
        recon, mask = masked_reconstruction(model, images, cfg.mask_ratio, cfg.seed + 2)
        kept = _kept_pixels(model, images, mask)
        if len(rows) == 1:
            rows.append(("masked input", images * kept + 0.5 * (1 - kept)))
        rows.append((name, images * kept + recon * (1 - kept)))
    groups = [(f"forget digits {', '.join(FORGET)}", per_set), (f"retain digits {', '.join(RETAIN)}", per_set)]
    save_grid(os.path.join(cfg.out, "reconstructions.png"), rows, groups,
              title=f"test digits, {cfg.mask_ratio:.0%} of patches removed (grey); each model fills them in")
