"""Feature extractors for FID, IS, cosine and accuracy, all offline.

- `digits`: a small CNN classifier trained on the digits' train split, cached: 128-d features,
  logits, and accuracy.
- `encoder`: the original model's encoder, pooled (its family's embed: MAE's patch tokens' mean).
- `inception:PATH`: a TorchScript Inception as clean-fid uses; it must return pool features, or
  (features, logits).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import InvalidValue, MissingPath
from ..weights import load_weights


@dataclass
class Extractor:
    name: str
    embed: Callable[[Tensor], tuple[Tensor, Optional[Tensor]]]  # images -> (features, logits or None)
    labels: bool  # whether logits are the data's classes (accuracy is meaningful)
    device: torch.device = torch.device("cpu")  # where embed runs; embed_all brings images there


class DigitsClassifier(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.head(f)


def cache_dir() -> str:
    return os.environ.get("FASTFORGET_CACHE", os.path.expanduser("~/.cache/fastforget"))


def digits_classifier(size: int = 16, epochs: int = 15, seed: int = 0) -> DigitsClassifier:
    """The digits classifier, trained once on the train split and cached."""
    from ..train import data as data_lib

    path = os.path.join(cache_dir(), f"digits_classifier_{size}_{epochs}_{seed}.pt")
    model = DigitsClassifier()
    if os.path.exists(path):
        model.load_state_dict(load_weights(path, "cached digits classifier"))
        return model.eval()
    torch.manual_seed(seed)
    train = data_lib.load_digits("train", size)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(train.images[idx])[1], train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def extractor(spec: str, original=None, device="cpu") -> Extractor:
    """`digits`, `encoder` (needs the original model, and runs where it is) or `inception:PATH`,
    on `device`."""
    device = torch.device(device)
    if spec == "digits":
        clf = digits_classifier().to(device)
        return Extractor("digits", lambda x: clf(x), labels=True, device=device)
    if spec == "encoder":
        if original is None:
            raise InvalidValue("--features encoder needs the original model")

        from .. import families

        family = families.of(original)
        return Extractor("encoder", lambda x: (family.embed(original, x), None), labels=False,
                         device=next(original.parameters()).device)
    if spec.startswith("inception:"):
        path = spec.split(":", 1)[1]
        if not os.path.exists(path):
            raise MissingPath(f"--features {spec}: no TorchScript file at {path!r}")
        net = torch.jit.load(path, map_location=device).eval()

        def embed(x: Tensor):
            x = nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear") * 255
            out = net(x)
            return (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        return Extractor("inception", embed, labels=False, device=device)
    raise InvalidValue(f"--features must be 'digits', 'encoder' or 'inception:PATH', got {spec!r}")


@torch.no_grad()
def embed_all(ex: Extractor, images: Tensor, batch: int = 256) -> tuple[Tensor, Optional[Tensor]]:
    """(features, logits or None) of images, float32 on the CPU, batch images at a time on ex.device."""
    feats, logits = [], []
    for chunk in images.split(batch):
        f, lg = ex.embed(chunk.to(ex.device))
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)
