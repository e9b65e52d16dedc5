"""Writes a folder of photo-like JPEGs for `fastforget bench data`: smooth random fields with mild
noise (they compress about as photos do), quality 90, in class folders c0, c1, ...
    python benchmarks/jpegs.py DIR [--classes 4] [--per-class 64] [--width 500] [--height 375]
500x375 is ImageNet's typical size (about 93 KB a file); 256x256 is Places365's train_256."""
import argparse
import os

import torch
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    for c in range(args.classes):
        os.makedirs(os.path.join(args.out, f"c{c}"), exist_ok=True)
        for i in range(args.per_class):
            low = torch.rand(1, 3, max(args.height // 16, 2), max(args.width // 16, 2), generator=gen)
            img = torch.nn.functional.interpolate(low, size=(args.height, args.width), mode="bicubic")
            img = (img + 0.06 * torch.randn(img.shape, generator=gen)).clamp(0, 1)[0].permute(1, 2, 0)
            Image.fromarray((img * 255).to(torch.uint8).numpy()).save(os.path.join(args.out, f"c{c}", f"{i}.jpg"),
                                                                      quality=90)


if __name__ == "__main__":
    main()
