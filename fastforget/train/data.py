"""Data for unlearning: labelled image sets, class selection, and the reference's 1:1 stream.

A data set here is (images, labels, classes): images (N, C, H, W), float32 in [0, 1] for the digits
and uint8 pixels for image folders (a quarter of the memory; unit_float converts a batch as it is
used); labels int64 (N,); classes the names. `digits` (1,797 8x8 handwritten digits) is embedded
in the package (fastforget/data), so nothing is downloaded; any other spec is an ImageFolder
directory (torchvision), or a directory whose classes a class list names (Places365's class.txt:
'/b/badlands' is the folder b/badlands), each class capped at its first per_class files if asked.
"""
from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..console import say
from ..data import DIGITS_CSV
from ..errors import InvalidValue, MissingPath


@dataclass
class ImageSet:
    images: Optional[Tensor]  # (N, C, H, W) float32 in [0, 1] or uint8 pixels; None until decode() (image folders)
    labels: Tensor  # (N,) int64
    classes: list[str]
    files: Optional[list[str]] = None  # image folders: each sample's file, read by decode()
    source: str = ""  # what the files are, for error messages ("--data directory '/x'")
    size: int = 0  # image folders: the side decode() resizes to
    skipped: int = 0  # unreadable files left out by decode(skip_bad=True)
    rows: Optional[Tensor] = None  # the embedded digits: each sample's row of digits.csv.gz (an audit names them)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def channels(self) -> int:
        """Channels per image: the decoded images', or 3 for image folders (decode() reads RGB)."""
        return self.images.shape[1] if self.images is not None else 3

    def subset(self, index: Tensor) -> "ImageSet":
        if self.images is not None:
            rows = None if self.rows is None else self.rows[index]
            return ImageSet(self.images[index], self.labels[index], self.classes, source=self.source, rows=rows)
        files = [self.files[i] for i in index.tolist()]
        return ImageSet(None, self.labels[index], self.classes, files, self.source, self.size)


def load_digits(split: str = "train", size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> ImageSet:
    """The embedded handwritten digits (fastforget/data), upsampled to size x size, split with a fixed seed."""
    if split not in ("train", "test"):
        raise InvalidValue(f"split must be 'train' or 'test', got {split!r}")
    with gzip.open(DIGITS_CSV, "rt") as f:
        rows = torch.tensor([[int(v) for v in line.split(",")] for line in f if line.strip()], dtype=torch.int64)
    images = rows[:, :64].reshape(-1, 1, 8, 8).float() / 16.0
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = rows[:, 64]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    index = order[n_test:] if split == "train" else order[:n_test]
    return ImageSet(images[index].clamp(0, 1), labels[index], [str(i) for i in range(10)], source="the embedded digits",
                    rows=index.clone())


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_class_list(path: str) -> list[str]:
    """A class list: one class folder per line, relative to the data directory, as Places365's
    class.txt ('/b/badlands', or '/b/badlands 26' as categories_places365.txt: the first word, its
    leading '/' dropped). Blank lines are skipped."""
    if not os.path.isfile(path):
        raise MissingPath(f"--classes file {path!r} does not exist")
    with open(path) as f:
        names = [line.split()[0].lstrip("/") for line in f if line.strip()]
    if not names:
        raise InvalidValue(f"--classes file {path!r} names no class")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidValue(f"--classes file {path!r} names {repeated} more than once")
    return names


def load_image_folder(path: str, size: int, what: str = "data directory", class_list: Optional[str] = None,
                      per_class: Optional[int] = None) -> ImageSet:
    """An image directory, indexed but not read: choosing classes and samples costs nothing, and
    decode() reads only the chosen files. Its classes are its sub-directories (ImageFolder), or
    the folders class_list names, in the list's order, each holding its images directly (Places365).
    per_class: each class's first files in sorted order (the reference's per-class cap)."""
    if not os.path.isdir(path):
        raise MissingPath(f"{what} {path!r} does not exist or is not a directory")
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise InvalidValue(f"per_class (--per-class) must be an int >= 1, got {per_class!r}")
    if class_list is None:
        from torchvision import datasets

        try:
            folder = datasets.ImageFolder(path)
        except FileNotFoundError as err:  # no class sub-directory, or no file with an image extension
            raise InvalidValue(f"{what} {path!r} holds no images in class sub-directories ({err})") from err
        classes, samples = list(folder.classes), folder.samples  # sorted within each class
    else:
        classes, samples = read_class_list(class_list), []
        for label, name in enumerate(classes):
            folder = os.path.join(path, name)
            if not os.path.isdir(folder):
                raise MissingPath(f"{what} {path!r} has no folder {name!r} (line {label + 1} of {class_list})")
            samples += [(os.path.join(folder, f), label) for f in sorted(os.listdir(folder))
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if per_class is not None:
        taken = [0] * len(classes)
        kept = []
        for file, label in samples:
            if taken[label] < per_class:
                taken[label] += 1
                kept.append((file, label))
        samples = kept
    if not samples:
        raise InvalidValue(f"{what} {path!r} holds no images in the classes' folders")
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return ImageSet(None, labels, classes, [file for file, _ in samples], f"{what} {path!r}", size)


def unit_float(images: Tensor) -> Tensor:
    """images as float32 in [0, 1]: uint8 pixels / 255 (exactly what torchvision's ToTensor gives),
    float images as they are. The 255 is a tensor on the images' device: CUDA divides by a Python
    number as a multiply by its reciprocal, one ulp off for half the pixel values."""
    if images.dtype != torch.uint8:
        return images
    return images.to(torch.float32).div_(torch.full((), 255.0, device=images.device))


DECODE_THREADS = 16  # at most: PIL decodes and resizes outside the GIL


def read_pixels(file: str, size: int):
    """One image file as (3, size, size) uint8 RGB pixels (PIL's resize), or, when it cannot be
    read, a string naming it and why. The held and the streamed data both read files with it, so
    both give the same pixels bit for bit."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(file) as img:
            return TF.pil_to_tensor(TF.resize(img.convert("RGB"), [size, size]))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
        return f"{file} ({type(err).__name__}: {err})"


def _read(files: list[str], size: int, keep: bool) -> list:
    """Each file read with read_pixels on up to DECODE_THREADS threads: its pixels (None unless
    keep), or the string naming it when it cannot be read."""
    def read(file: str):
        pixels = read_pixels(file, size)
        return pixels if keep or isinstance(pixels, str) else None

    with ThreadPoolExecutor(max(1, min(DECODE_THREADS, os.cpu_count() or 1))) as pool:
        return list(pool.map(read, files))


def _readable(data: ImageSet, bad: list[tuple[int, str]], skip_bad: bool) -> list[int]:
    """The positions of data's readable files, given the (position, why) of the bad ones: an
    error listing them, or, with skip_bad, a counted skip."""
    if bad and not skip_bad:
        listed = "; ".join(why for _, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InvalidValue(f"{data.source}: {len(bad)} of {len(data.files)} image files cannot be read: {listed}. "
                         f"Fix or remove them, or skip them with --skip-bad-images")
    if bad:
        say(f"skipped {len(bad)} unreadable image files of {len(data.files)} in {data.source}")
    skipped = {i for i, _ in bad}
    good = [i for i in range(len(data.files)) if i not in skipped]
    if not good:
        raise InvalidValue(f"{data.source} holds no readable images")
    return good


def decode(data: ImageSet, skip_bad: bool = False) -> ImageSet:
    """data with its images read, resized to data.size x data.size RGB, as uint8 pixels (already-
    read sets as they are). Unreadable files are named, or skipped (ImageSet.skipped) with
    skip_bad: either way before any training starts."""
    if data.images is not None:
        return data
    results = _read(data.files, data.size, keep=True)
    good = _readable(data, [(i, r) for i, r in enumerate(results) if isinstance(r, str)], skip_bad)
    return ImageSet(torch.stack([results[i] for i in good]), data.labels[good], data.classes,
                    [data.files[i] for i in good], data.source, data.size, skipped=len(data.files) - len(good))


def check(data: ImageSet, skip_bad: bool = False, rank: int = 0, world: int = 1) -> ImageSet:
    """data (an image folder's, to be streamed) with every file read once and dropped, as decode()
    reads them: the same files are named or skipped, and nothing is held. Under torchrun each of
    the `world` ranks reads every world-th file and all learn every rank's bad ones."""
    if data.images is not None:
        return data
    mine = list(range(rank, len(data.files), world))
    results = _read([data.files[i] for i in mine], data.size, keep=False)
    bad = [(mine[j], r) for j, r in enumerate(results) if isinstance(r, str)]
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, bad)
        bad = sorted(b for rank_bad in gathered for b in rank_bad)
    good = _readable(data, bad, skip_bad)
    return ImageSet(None, data.labels[good], data.classes, [data.files[i] for i in good], data.source, data.size,
                    skipped=len(data.files) - len(good))


def decoded_bytes(data: ImageSet) -> int:
    """What holding data's images takes: as they are, or as uint8 pixels once decoded."""
    if data.images is not None:
        return data.images.numel() * data.images.element_size()
    return len(data) * data.channels * data.size * data.size


def load(spec: str, size: int, split: str = "train", what: str = "data directory", class_list: Optional[str] = None,
         per_class: Optional[int] = None) -> ImageSet:
    """`digits` (read) or an image directory (indexed: decode() reads it; see load_image_folder);
    what names the option in errors."""
    if spec != "digits":
        return load_image_folder(spec, size, what, class_list, per_class)
    if class_list is not None or per_class is not None:
        raise InvalidValue("--classes and --per-class select an image directory's classes; the digits have their own")
    return load_digits(split, size)


def check_channels(data: ImageSet, channels: int, model: str) -> None:
    """A model that takes `channels`-channel images must get them: named before any training."""
    if data.channels != channels:
        kind = {1: "grayscale", 3: "RGB"}
        got = f"{kind.get(data.channels, '')} images ({data.channels} channel{'s' * (data.channels != 1)})".strip()
        raise InvalidValue(f"model {model} takes {channels}-channel images, but {data.source} gives {got}; choose a model "
                           f"with {data.channels} input channels, or data with {channels}")


def class_indices(data: ImageSet, names: Optional[Sequence[str]], what: str) -> list[int]:
    """Class names, indices or index ranges ('50-99', both ends included) -> indices; an unknown
    class is an error listing the known ones."""
    if not names:
        return []
    out = []
    for name in names:
        name = str(name)
        low, dash, high = name.partition("-")
        if name in data.classes:
            out.append(data.classes.index(name))
        elif name.isdigit() and int(name) < len(data.classes):
            out.append(int(name))
        elif dash and low.isdigit() and high.isdigit() and int(low) <= int(high) < len(data.classes):
            out += range(int(low), int(high) + 1)
        else:
            known = ", ".join(data.classes) if len(data.classes) <= 20 else \
                f"{', '.join(data.classes[:10])}, ... ({len(data.classes)}: indices 0-{len(data.classes) - 1})"
            raise InvalidValue(f"unknown {what} class {name!r}; known classes: {known}")
    return out


RETAIN_PICKS = ("random", "first")


@dataclass
class UnlearnSets:
    forget: ImageSet
    retain: ImageSet  # real retain samples, then proxy ones


def select(data: ImageSet, forget: Sequence[str], retain: Sequence[str] = (), proxy: Sequence[str] = (),
           proxy_data: Optional[ImageSet] = None, retain_ratio: float = 1.0, proxy_ratio: float = 1.0,
           seed: int = 0, retain_pick: str = "random") -> UnlearnSets:
    """The reference's sets: every forget sample; retain_ratio * |forget| real retain samples (from
    the retain classes, default: every class not forgotten and not proxy); then proxy samples (from
    the proxy classes or proxy_data) up to proxy_ratio * |forget| retain samples in all.
    retain_pick: which real retain samples, "random" or "first" in the data's order (Palette's
    reference cuts its retain list at the end: the last classes lose images)."""
    if retain_pick not in RETAIN_PICKS:
        raise InvalidValue(f"retain_pick (--retain-pick) must be one of {RETAIN_PICKS}, got {retain_pick!r}")
    gen = torch.Generator().manual_seed(seed)
    forget_ids = class_indices(data, forget, "forget")
    if not forget_ids:
        raise InvalidValue("forget classes must name at least one class")
    proxy_ids = class_indices(data, proxy, "proxy")
    retain_ids = class_indices(data, retain, "retain") or (
        [] if proxy_ids or proxy_data is not None else
        [c for c in range(len(data.classes)) if c not in forget_ids])
    overlap = set(forget_ids) & (set(retain_ids) | set(proxy_ids))
    if overlap:
        raise InvalidValue(f"classes {[data.classes[c] for c in sorted(overlap)]} are both forgotten and kept")
    forget_set = data.subset(torch.isin(data.labels, torch.tensor(forget_ids)).nonzero()[:, 0])
    if len(forget_set) == 0:
        raise InvalidValue(f"the forget classes {list(forget)} have no samples")

    def sample(pool: ImageSet, count: int, first: bool = False) -> ImageSet:
        count = min(count, len(pool))
        return pool.subset(torch.arange(count) if first else torch.randperm(len(pool), generator=gen)[:count])

    parts = []
    if retain_ids:
        real = data.subset(torch.isin(data.labels, torch.tensor(retain_ids)).nonzero()[:, 0])
        parts.append(sample(real, round(retain_ratio * len(forget_set)), first=retain_pick == "first"))
    if proxy_ids or proxy_data is not None:
        pool = proxy_data if proxy_data is not None else data.subset(
            torch.isin(data.labels, torch.tensor(proxy_ids)).nonzero()[:, 0])
        have = sum(len(p) for p in parts)
        parts.append(sample(pool, max(round(proxy_ratio * len(forget_set)) - have, 0)))
    if not parts or sum(len(p) for p in parts) == 0:
        raise InvalidValue("no retain samples: name retain classes, proxy classes or proxy data")
    labels = torch.cat([p.labels for p in parts])
    if all(p.images is not None for p in parts):
        rows = None if any(p.rows is None for p in parts) else torch.cat([p.rows for p in parts])
        retain_set = ImageSet(torch.cat([p.images for p in parts]), labels, data.classes, source=parts[0].source,
                              rows=rows)
    elif all(p.images is None for p in parts):
        retain_set = ImageSet(None, labels, data.classes, [f for p in parts for f in p.files],
                              " and ".join(dict.fromkeys(p.source for p in parts)), data.size)
    else:
        raise InvalidValue("proxy data must be of the data's kind: an image folder beside an image folder "
                         "(the embedded digits take proxy classes of their own)")
    return UnlearnSets(forget_set, retain_set)


def stream(sets: UnlearnSets, epoch: int, seed: int) -> tuple[Tensor, Tensor]:
    """One epoch's order: forget and retain samples 1:1 (the smaller set oversampled), shuffled.
    Returns (index into cat(forget, retain), is_forget), a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n_f, n_r = len(sets.forget), len(sets.retain)
    n = max(n_f, n_r)
    forget_idx = torch.randperm(n_f, generator=gen).repeat(n // n_f + 1)[:n]
    retain_idx = n_f + torch.randperm(n_r, generator=gen).repeat(n // n_r + 1)[:n]
    index = torch.cat([forget_idx, retain_idx])
    is_forget = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    order = torch.randperm(2 * n, generator=gen)
    return index[order], is_forget[order]
