"""`fastforget sweep`: the paper's ablation over the forget weight alpha, as a curve.

Runs ours on the demo's digits once per alpha (sharing the demo's pretrained model; a finished
run is reused), evaluates one task with the digits features, and draws tradeoff_{task}.png:
retain quality (accuracy of the retain digits' completions) against forget removal (forget FID
over the original's), one point per alpha.
"""
from __future__ import annotations

import json
import os

from .. import families
from ..console import say
from ..eval.features import extractor
from ..eval.run import evaluate
from .demo import RETAIN, DemoConfig, ensure_original, demo_sets, unlearn_digits


def run(out: str, forget_weights, cfg: DemoConfig = None, task: str = "inpaint") -> dict:
    cfg = cfg or DemoConfig(out=out)
    original = ensure_original(cfg)
    models = {"original": families.load(original)}
    seeds = cfg.eval_seeds or families.get(cfg.family).demo.eval_seeds
    for alpha in forget_weights:
        name = f"alpha={alpha:g}"
        path = os.path.join(out, f"ours_alpha{alpha:g}")
        if os.path.exists(os.path.join(path, "checkpoint.pt")):
            say(f"reusing {path}")
        else:
            say(f"unlearning with forget weight {alpha:g}")
            unlearn_digits(cfg, original, path, retain_classes=RETAIN, forget_weight=alpha)
        models[name] = families.load(os.path.join(path, "checkpoint.pt"))
    report = evaluate(models, demo_sets(), extractor("digits"), (task,), 0.5, seeds=seeds,
                      sample_steps=cfg.sample_steps)[task]
    base = report["original"]
    points = [{"model": name, "forget_fid_ratio": r["forget"]["fid"] / base["forget"]["fid"],
               "retain_accuracy": r["retain"]["accuracy"], "forget_accuracy": r["forget"]["accuracy"],
               "retain_fid_ratio": r["retain"]["fid"] / base["retain"]["fid"]} for name, r in report.items()]
    with open(os.path.join(out, f"sweep_{task}.json"), "w") as f:
        json.dump({"task": task, "points": points, "report": report}, f, indent=2)
    draw(points, task, os.path.join(out, f"tradeoff_{task}.png"))
    for p in points:
        say(f"{p['model']:<12} forget FID x{p['forget_fid_ratio']:.2f}  retain accuracy {p['retain_accuracy']:.3f}"
            f"  forget accuracy {p['forget_accuracy']:.3f}")
    return {"points": points}


def draw(points, task: str, path: str, size=(520, 380), margin=56) -> None:
    """A scatter-and-line plot with PIL: x forget FID ratio, y retain accuracy, labelled points."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    g = ImageDraw.Draw(img)
    xs = [p["forget_fid_ratio"] for p in points]
    ys = [p["retain_accuracy"] for p in points]
    x_lo, x_hi = min(xs) * 0.95, max(xs) * 1.05 + 1e-9
    y_lo, y_hi = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.05)
    w, h = size[0] - 2 * margin, size[1] - 2 * margin

    def at(x, y):
        return margin + (x - x_lo) / (x_hi - x_lo) * w, size[1] - margin - (y - y_lo) / (y_hi - y_lo + 1e-9) * h

    g.rectangle([margin, margin, margin + w, margin + h], outline=(150, 150, 150))
    for k in range(5):
        x = x_lo + (x_hi - x_lo) * k / 4
        y = y_lo + (y_hi - y_lo) * k / 4
        g.text((at(x, y_lo)[0] - 10, size[1] - margin + 6), f"{x:.2f}", fill=(0, 0, 0))
        g.text((8, at(x_lo, y)[1] - 6), f"{y:.2f}", fill=(0, 0, 0))
    g.text((margin + w // 2 - 90, size[1] - 22), "forget removal: forget FID / original's", fill=(0, 0, 0))
    g.text((margin, 18), f"retain quality: accuracy on retain completions ({task})", fill=(0, 0, 0))
    line = [at(p["forget_fid_ratio"], p["retain_accuracy"]) for p in points if p["model"] != "original"]
    if len(line) > 1:
        g.line(line, fill=(40, 90, 220), width=2)
    for p in points:
        x, y = at(p["forget_fid_ratio"], p["retain_accuracy"])
        colour = (220, 60, 40) if p["model"] == "original" else (40, 90, 220)
        g.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        g.text((x + 6, y - 14), p["model"], fill=colour)
    img.save(path)
