"""`fastforget eval`: each model on each task and set, with the paper's metrics; the reference's
CSV formats (fid_is_eval_{task}.csv, clip_cosine_{task}.csv), report.json, results.md, an image
grid per task and a t-SNE plot of ground-truth and generated embeddings."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Optional

import torch
from torch import Tensor

from .. import audit, families
from ..errors import InvalidValue
from . import metrics, mia as mia_lib
from .features import Extractor, embed_all

SETS = ("retain", "forget")


TASKS = ("inpaint", "outpaint")


def check_tasks(family, tasks, ratio: float) -> None:
    """The tasks must be ones the family generates for, the ratio a fraction."""
    for task in tasks:
        if task not in TASKS:
            raise InvalidValue(f"task must be one of {TASKS}, got {task!r}")
        if task not in family.tasks:
            raise InvalidValue(f"--task {task}: {family.name} models generate for {', '.join(family.tasks)} only")
    if not 0 < ratio < 1:
        raise InvalidValue(f"ratio (--ratio) must be in (0, 1), got {ratio!r}")


@torch.no_grad()
def evaluate(models: dict, sets: dict, extractor: Extractor, tasks=None, ratio: float = 0.5,
             out: Optional[str] = None, batch_size: int = 256, seeds=(0,), sample_steps: Optional[int] = None) -> dict:
    """report[task][model][set] = {mse, psnr, fid, is_mean, is_std, cosine, accuracy}; files under out.
    tasks: the models' family's by default. Each model completes its images batch_size at a time
    on its own device, once per seed (a sampler's randomness); each metric is the mean over the
    seeds, with its values per seed under "<metric>_seeds" when there are several. sample_steps: a
    sampler's strided schedule (faster; not the reference's). The metrics are computed on the CPU."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidValue(f"batch_size (--batch-size) must be an int >= 1, got {batch_size!r}")
    family = families.of(next(iter(models.values())))
    tasks = tuple(tasks or family.tasks)
    check_tasks(family, tasks, ratio)
    report: dict = {}
    truth = {s: embed_all(extractor, sets[s].images) for s in SETS}
    generated: dict = {}
    for task in tasks:
        report[task] = {}
        for name, model in models.items():
            model.eval()
            report[task][name] = {}
            for s in SETS:
                runs = []
                for seed in seeds:
                    output = _complete_all(model, sets[s].images, task, ratio, seed, batch_size, sample_steps)
                    generated.setdefault((task, name, s), output)  # the first seed's, for the pictures
                    runs.append(_scores(output, sets[s], model, task, ratio, extractor, truth[s][0]))
                report[task][name][s] = _mean_over_seeds(runs)
    if out:
        from ..train.loop import output_dir

        output_dir(out)
        write_outputs(report, out, how_generated(family, seeds, sample_steps))
        for task in tasks:
            _grid(models, sets, task, ratio, generated, os.path.join(out, f"grid_{task}.png"))
        _tsne(extractor, sets, generated, tasks[0], models, os.path.join(out, f"tsne_{tasks[0]}.png"))
    return report


def _scores(output: Tensor, data, model, task: str, ratio: float, extractor: Extractor, truth: Tensor) -> dict:
    region = families.of(model).removed_region(model, task, ratio)
    mse = metrics.region_mse(output, data.images, region)
    feats, logits = embed_all(extractor, output)
    row = {"mse": mse, "psnr": metrics.psnr(mse), "fid": metrics.frechet_distance(feats, truth),
           "cosine": metrics.mean_cosine(feats, truth)}
    if logits is not None:
        row["is_mean"], row["is_std"] = metrics.inception_score(logits)
        if extractor.labels:
            row["accuracy"] = float((logits.argmax(1) == data.labels).float().mean())
    return row


def _mean_over_seeds(runs: list[dict]) -> dict:
    if len(runs) == 1:
        return runs[0]
    row = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    row.update({f"{k}_seeds": [r[k] for r in runs] for k in runs[0]})
    return row


def _complete_all(model, images: Tensor, task: str, ratio: float, seed: int, batch_size: int,
                  steps: Optional[int]) -> Tensor:
    """The family's completion of images in batches on the model's device; the results on the CPU."""
    family = families.of(model)
    device = next(model.parameters()).device
    return torch.cat([family.complete(model, chunk.to(device), task, ratio, seed + 1_000_003 * k, steps).cpu()
                      for k, chunk in enumerate(images.split(batch_size))])


def evaluate_checkpoints(checkpoints: dict, data: str, forget, retain, tasks, ratio: float, features: str,
                         out: str, device: Optional[str] = None, batch_size: int = 256, seeds=(0,),
                         sample_steps: Optional[int] = None, class_list: Optional[str] = None,
                         per_class: Optional[int] = None, audit_record: Optional[str] = None, mia: bool = False,
                         members: Optional[str] = None) -> dict:
    """`fastforget eval`: models by checkpoint path (the first is the original), sets by class, on
    device (default: CUDA when present); class_list and per_class as data.load_image_folder's;
    audit_record: an unlearning run's audit.json, to which the metrics are added. mia: also the
    membership-inference test (eval/mia.py), the members being the classes' training images: the
    digits' train split, or the `members` directory's (the image folder the models trained on)."""
    from ..train import data as data_lib
    from ..train.loop import resolve_device
    from .features import extractor

    if not checkpoints:
        raise InvalidValue("--models must name at least one NAME=CHECKPOINT")
    if audit_record is not None:
        audit.load(audit_record)  # a bad record is named before any work
    if mia and data != "digits" and members is None:
        raise InvalidValue("--mia on an image directory needs --members DIR: the training images of its classes "
                           "(the test images in --data are the non-members)")
    if members is not None and not mia:
        raise InvalidValue("--members is the membership-inference test's: give --mia with it")
    device = resolve_device(device)
    models = {name: families.load(path).to(device) for name, path in checkpoints.items()}
    original = next(iter(models.values()))
    family = families.of(original)
    mixed = sorted({families.of(m).name for m in models.values()} - {family.name})
    if mixed:
        raise InvalidValue(f"--models must all be of one family ({family.name}, the first's), got {mixed} too")
    tasks = tuple(tasks or family.tasks)
    check_tasks(family, tasks, ratio)
    channels, side = family.image_shape(original)
    dataset = data_lib.load(data, side, split="test", what="--data directory", class_list=class_list,
                            per_class=per_class)
    data_lib.check_channels(dataset, channels, original.config_name)
    member_data = None
    if mia:
        member_data = data_lib.load(members or data, side, split="train", what="--members directory",
                                    class_list=class_list, per_class=per_class)
        data_lib.check_channels(member_data, channels, original.config_name)

    def chosen(source, s: str, names, what: str):
        ids = torch.tensor(data_lib.class_indices(source, names, s))
        decoded = data_lib.decode(source.subset(torch.isin(source.labels, ids).nonzero()[:, 0]))
        if len(decoded) < 10:
            raise InvalidValue(f"the {s} classes {list(names)} have {len(decoded)} {what} images; 10 at least")
        return dataclasses.replace(decoded, images=data_lib.unit_float(decoded.images))

    sets = {s: chosen(dataset, s, names, "test") for s, names in (("forget", forget), ("retain", retain))}
    report = evaluate(models, sets, extractor(features, original, device), tasks, ratio, out, batch_size, seeds,
                      sample_steps)
    note = how_generated(family, seeds, sample_steps)
    print((f"{note}\n" if note else "") + markdown(report))
    if mia:
        seen = {s: chosen(member_data, s, names, "training").images for s, names in (("forget", forget),
                                                                                       ("retain", retain))}
        report["mia"] = mia_lib.attack(models, seen, {s: sets[s].images for s in sets}, tasks[0], ratio, batch_size,
                                       sample_steps)
        print(mia_lib.markdown(report["mia"]))
        if out:
            write_outputs(report, out, note)
    if audit_record is not None:
        audit.add_evaluation(audit_record, checkpoints, report, {
            "data": data, "forget_classes": list(forget), "retain_classes": list(retain), "tasks": list(tasks),
            "ratio": ratio, "features": features, "seeds": list(seeds), "sample_steps": sample_steps})
        print(f"added the metrics to {audit_record}")
    return report


def how_generated(family, seeds, sample_steps: Optional[int]) -> str:
    """What results.md says of its numbers: the sampler's schedule and seeds, where they matter."""
    notes = [note] if (note := family.generation_note(sample_steps)) else []
    if len(seeds) > 1:
        notes.append(f"each metric the mean over {len(seeds)} seeds ({', '.join(map(str, seeds))})")
    return "; ".join(notes)


def write_outputs(report: dict, out: str, note: str = "") -> None:
    for task, per_model in _tasks(report).items():
        with open(os.path.join(out, f"fid_is_eval_{task}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            for name, r in per_model.items():
                w.writerow([name, r["retain"]["fid"], r["retain"].get("is_mean", ""), r["retain"].get("is_std", ""),
                            r["forget"]["fid"], r["forget"].get("is_mean", ""), r["forget"].get("is_std", "")])
        with open(os.path.join(out, f"clip_cosine_{task}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            for name, r in per_model.items():
                w.writerow([name, r["retain"]["cosine"], r["forget"]["cosine"]])
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write((f"{note}\n\n" if note else "") + markdown(report))
        if "mia" in report:
            f.write("\n" + mia_lib.markdown(report["mia"]))


def markdown(report: dict) -> str:
    cols = ("mse", "psnr", "fid", "is_mean", "cosine", "accuracy")
    lines = []
    for task, per_model in _tasks(report).items():
        lines += [f"### {task}", "", "| model | " + " | ".join(f"{s} {c}" for s in SETS for c in cols) + " |",
                  "|---|" + "---|" * (2 * len(cols))]
        for name, r in per_model.items():
            cells = [f"{r[s][c]:.4g}" if c in r[s] else "" for s in SETS for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _tasks(report: dict) -> dict:
    """The report's per-task metrics, without its membership-inference entry."""
    return {task: per_model for task, per_model in report.items() if task in TASKS}


def _grid(models, sets, task, ratio, generated, path, per_set: int = 6) -> None:
    """Rows: ground truth, the task's input (removed region grey), each model's output; forget
    then retain columns, each row and group named on the image."""
    from .pictures import save_grid

    truth = torch.cat([sets[s].images[:per_set] for s in ("forget", "retain")])
    first = next(iter(models.values()))
    region = families.of(first).removed_region(first, task, ratio)
    rows = [("ground truth", truth), ("input", truth * (1 - region) + 0.5 * region)]
    rows += [(name, torch.cat([generated[(task, name, s)][:per_set] for s in ("forget", "retain")]))
             for name in models]
    groups = [(f"{s} set{_classes(sets[s])}", min(per_set, len(sets[s]))) for s in ("forget", "retain")]
    save_grid(path, rows, groups, title=f"{task}: the removed region grey in the input; each model fills it in")


def _classes(data) -> str:
    """' (digits 0, 1)'-like: the set's classes when they are few enough to name."""
    names = [data.classes[c] for c in data.labels.unique().tolist()] if data.classes else []
    return f" ({', '.join(names)})" if 0 < len(names) <= 6 else ""


def _tsne(extractor, sets, generated, task, models, path, per_set: int = 150) -> None:
    """t-SNE of ground-truth and generated embeddings of both sets, one panel per model, with a
    title and a legend, as a PNG."""
    from PIL import Image, ImageDraw
    from sklearn.manifold import TSNE

    from .pictures import font

    colours = {("truth", "retain"): (40, 90, 220), ("gen", "retain"): (120, 170, 255),
               ("truth", "forget"): (220, 60, 40), ("gen", "forget"): (255, 160, 120)}
    names = {"truth": "ground truth", "gen": "generated"}
    size, pad, top = 240, 10, 52
    canvas = Image.new("RGB", (max(len(models) * (size + pad) + pad, 560), top + size + pad + 22), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), f"t-SNE of {extractor.name} features, {task}: ground truth and each model's outputs",
              fill=(0, 0, 0), font=font(14))
    for i, ((kind, s), colour) in enumerate(colours.items()):  # the legend
        x = pad + i * 135
        draw.ellipse([x, 33, x + 8, 41], fill=colour)
        draw.text((x + 12, 30), f"{s} {names[kind]}", fill=(0, 0, 0), font=font(12))
    for k, name in enumerate(models):
        groups, feats = [], []
        for s in SETS:
            for kind, images in (("truth", sets[s].images[:per_set]), ("gen", generated[(task, name, s)][:per_set])):
                f = embed_all(extractor, images)[0]
                feats.append(f)
                groups += [(kind, s)] * len(f)
        xy = TSNE(n_components=2, perplexity=20, init="pca", random_state=0).fit_transform(torch.cat(feats).numpy())
        xy = (xy - xy.min(0)) / (xy.max(0) - xy.min(0) + 1e-9) * (size - 8) + 4
        x0 = pad + k * (size + pad)
        draw.rectangle([x0, top, x0 + size, top + size], outline=(180, 180, 180))
        for (px, py), g in zip(xy, groups):
            draw.ellipse([x0 + px - 2, top + py - 2, x0 + px + 2, top + py + 2], fill=colours[g])
        draw.text((x0 + 4, top + size + 4), name, fill=(0, 0, 0), font=font(13))
    canvas.save(path)
