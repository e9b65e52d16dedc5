"""A membership-inference test: does a model still tell the images it was trained on from unseen
ones of the same classes?

The attack scores each image by the model's own reconstruction error on the removed region (the
eval task's: a lower error says "seen in training"). Its AUC separates the classes' training
images (members: the original model saw them) from their test images (non-members). 0.5 is
chance. An unlearned model that kept no trace of its forget set scores no higher on it than the
original does on unseen data, and near 0.5 once its forget errors are as those of unseen images.
The interval is a bootstrap over both groups (percentile, BOOTSTRAPS resamples, a fixed seed).
What it does not show: a stronger attacker (shadow models, likelihood ratios, features) may find
what this one misses; at the digits' sizes (tens to hundreds of images a group) the intervals are
wide.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import families

BOOTSTRAPS = 1000


def region_errors(model, images: Tensor, task: str, ratio: float, seed: int, batch_size: int,
                  sample_steps: Optional[int] = None) -> Tensor:
    """Each image's mean squared error over the removed region of its completion (N,), on the CPU."""
    family = families.of(model)
    device = next(model.parameters()).device
    region = family.removed_region(model, task, ratio)
    errors = []
    for k, chunk in enumerate(images.split(batch_size)):
        out = family.complete(model, chunk.to(device), task, ratio, seed + 1_000_003 * k, sample_steps).cpu()
        mask = region.expand_as(chunk).to(chunk.dtype)
        errors.append(((out - chunk) ** 2 * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1))
    return torch.cat(errors).double()


def auc(members: Tensor, non_members: Tensor) -> float:
    """P(a member's error < a non-member's), ties counted half: the Mann-Whitney AUC of the attack
    that calls the lower error a member."""
    scores = torch.cat([-members, -non_members])
    ranks = _ranks(scores)
    n_m, n_n = len(members), len(non_members)
    return float((ranks[:n_m].sum() - n_m * (n_m + 1) / 2) / (n_m * n_n))


def _ranks(x: Tensor) -> Tensor:
    """1-based ranks, ties given their mean rank."""
    order = torch.argsort(x)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    mean_rank = torch.cumsum(counts, 0).to(x.dtype) - (counts.to(x.dtype) - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = mean_rank[inverse]
    return ranks


def bootstrap_interval(members: Tensor, non_members: Tensor, reps: int = BOOTSTRAPS, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([auc(members[torch.randint(len(members), (len(members),), generator=gen)],
                               non_members[torch.randint(len(non_members), (len(non_members),), generator=gen)])
                           for _ in range(reps)])
    tail = (1 - level) / 2
    return float(values.quantile(tail)), float(values.quantile(1 - tail))


def attack(models: dict, members: dict, non_members: dict, task: str, ratio: float, batch_size: int = 256,
           sample_steps: Optional[int] = None) -> dict:
    """mia[model][set] = {auc, low, high, members, non_members, member_mse, non_member_mse} for each
    set ("forget", "retain") of member and non-member images."""
    out: dict = {"task": task, "ratio": ratio}
    for name, model in models.items():
        model.eval()
        out[name] = {}
        for s in members:
            with torch.no_grad():
                err_m = region_errors(model, members[s], task, ratio, 0, batch_size, sample_steps)
                err_n = region_errors(model, non_members[s], task, ratio, 0, batch_size, sample_steps)
            low, high = bootstrap_interval(err_m, err_n)
            out[name][s] = {"auc": auc(err_m, err_n), "low": low, "high": high, "members": len(err_m),
                            "non_members": len(err_n), "member_mse": float(err_m.mean()),
                            "non_member_mse": float(err_n.mean())}
    return out


def markdown(mia: dict) -> str:
    results = {name: r for name, r in mia.items() if isinstance(r, dict)}
    sets = list(next(iter(results.values())))
    lines = [f"### membership inference ({mia['task']}: the removed region's MSE; the AUC of telling training from "
             f"test images, with its 95% bootstrap interval; 0.5 is chance)", "",
             "| model | " + " | ".join(f"{s} AUC | {s} MSE seen / unseen" for s in sets) + " |",
             "|---|" + "---|---|" * len(sets)]
    for name, r in results.items():
        cells = [f"{r[s]['auc']:.3f} [{r[s]['low']:.3f}, {r[s]['high']:.3f}] | {r[s]['member_mse']:.4f} / "
                 f"{r[s]['non_member_mse']:.4f}" for s in sets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = next(iter(results.values()))
    lines += ["", "members: the classes' training images (" + ", ".join(f"{s} {counts[s]['members']}" for s in sets)
              + "); non-members: their test images (" + ", ".join(f"{s} {counts[s]['non_members']}" for s in sets)
              + ")", ""]
    return "\n".join(lines)
