"""The reference's crop-flip augmentation, batched: torchvision's distribution and geometry."""
import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from fastforget.train.augment import DRAWS, RATIO, SCALE, TRIES, crop_flip, crop_flip_params, source_size


def test_crops_are_drawn_as_torchvisions_random_resized_crop():
    n = 20000
    width, height, left, top, flip = crop_flip_params(torch.rand(n, DRAWS, generator=torch.Generator()
                                                                 .manual_seed(0))).unbind(1)
    area, aspect = width * height, width / height
    assert area.min() >= SCALE[0] - 1e-6 and area.max() <= SCALE[1] + 1e-6
    assert aspect.min() >= RATIO[0] - 1e-6 and aspect.max() <= RATIO[1] + 1e-6
    assert (left >= 0).all() and (left + width <= 1 + 1e-6).all()
    assert (top >= 0).all() and (top + height <= 1 + 1e-6).all()
    assert abs(flip.mean().item() - 0.5) < 0.02
    # torchvision's own draws on a 1000 x 1000 image (its rejection of crops that do not fit
    # favours smaller areas: the mean is ~0.54, not U(0.2, 1)'s 0.6)
    torch.manual_seed(1)
    image = torch.empty(1, 1000, 1000)
    boxes = torch.tensor([RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)],
                         dtype=torch.float64)
    theirs_area = boxes[:, 2] * boxes[:, 3] / 1e6
    theirs_left = boxes[:, 1] / 1000
    for ours, theirs in ((area, theirs_area), (torch.log(aspect), torch.log(boxes[:, 3] / boxes[:, 2])),
                         (left, theirs_left)):
        assert abs(ours.double().mean() - theirs.mean()) < 0.01
        assert abs(ours.double().std() - theirs.std()) < 0.01


def test_no_crop_that_fits_in_ten_tries_takes_the_whole_image():
    uniforms = torch.zeros(1, DRAWS)
    uniforms[:, :TRIES] = 0.99  # nearly all of the area, at aspect 3/4: taller than the image, every time
    width, height, left, top, _ = crop_flip_params(uniforms)[0].tolist()
    assert (width, height, left, top) == (1.0, 1.0, 0.0, 0.0)


def test_the_whole_image_unflipped_is_the_image_and_flipped_its_mirror():
    images = torch.rand(3, 3, 12, 12)
    whole = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]).expand(3, 5)
    torch.testing.assert_close(crop_flip(images, 12, whole), images, rtol=0, atol=1e-5)
    mirrored = whole.clone()
    mirrored[:, 4] = 1.0
    torch.testing.assert_close(crop_flip(images, 12, mirrored), images.flip(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("box", [(0, 0, 16, 16), (5, 9, 20, 12), (12, 3, 8, 28)])
def test_a_crop_is_torchvisions_resized_crop(box):
    """Inside the crop (at its edges torchvision pads the cut-out, where the source has real pixels)."""
    top, left, height, width = box
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    image = torch.stack([torch.sin(3 * x + y), torch.cos(2 * y - x), x * y]) * 0.4 + 0.5  # smooth, in (0, 1)
    want = TF.resized_crop(image, top, left, height, width, [24, 24], InterpolationMode.BICUBIC, antialias=False)
    params = torch.tensor([[width / 32, height / 32, left / 32, top / 32, 0.0]])
    got = crop_flip(image[None], 24, params)[0]
    torch.testing.assert_close(got[:, 3:-3, 3:-3], want.clamp(0, 1)[:, 3:-3, 3:-3], rtol=0, atol=2e-3)


def test_crops_come_from_images_held_larger():
    assert source_size(224, "crop-flip") == 256 and source_size(224, "none") == 224
    assert math.isclose(source_size(16, "crop-flip") / 16, 8 / 7, rel_tol=0.1)


def test_the_trainer_crops_each_step_as_its_generator_says():
    from fastforget.train.loop import Dist
    from fastforget.train.unlearn import _augmenter  # noqa: F401

    augment, images = _augmenter("crop-flip", 16, Dist()), torch.rand(4, 1, 18, 18)
    a, b = (augment(images, torch.Generator().manual_seed(0)) for _ in range(2))
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, augment(images, torch.Generator().manual_seed(1)))
    assert _augmenter("none", 16, Dist())(images, None) is images


def test_pretraining_crops_too(tmp_path):
    from fastforget.train import LoopConfig, PretrainConfig, pretrain

    metrics = pretrain(PretrainConfig(device="cpu", augment="crop-flip",
                                      loop=LoopConfig(out=str(tmp_path), epochs=0.05, batch_size=32, progress=False)))
    assert metrics["step"] >= 1 and (tmp_path / "checkpoint.pt").exists()
