"""The method on an encoder fastforget does not know: bring the features, fastforget brings the rest.

Li et al. (ICLR 2024) fine-tune only an image-to-image model's encoder: on retain rows its
features stay the original encoder's, on forget rows they become the features the original gives
a noised input; the decoder stays frozen. For a model outside fastforget.families, say which
calls give the features and what each side sees, and train with the loss in your own loop:

    teacher = frozen_copy(encoder)              # the original, before any step
    method = EncoderUnlearning(
        student=lambda x: encoder(x),           # features: a (B, ...) tensor or a list of them
        teacher=lambda x: teacher(x),           # the same call on the frozen copy
        forget_weight=0.2)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=5e-5)
    for images, is_forget in loader:
        method.loss(images, is_forget).loss.backward()
        optimizer.step(); optimizer.zero_grad()

By default both sides see the batch, the teacher's forget rows replaced by Gaussian noise with the
batch's mean and std (make_teacher_batch, the MAE method's routing). A model whose inputs are
built per step passes `inputs`: a diffusion model's are make_diffusion_inputs's pair, the hole of
a forget image pure noise on the teacher's side (tests/test_byo.py does it with a diffusers UNet).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import InvalidType, InvalidValue
from .ops import UnlearnLossOutput, make_teacher_batch, unlearn_loss
from .ops.unlearn_loss import NORMALIZE

Features = Union[Tensor, Sequence[Tensor]]


def frozen_copy(module: nn.Module) -> nn.Module:
    """The teacher: a copy of module as it is now, with no parameter that trains. It keeps
    module's mode (train or eval), as the references' teachers do."""
    return copy.deepcopy(module).requires_grad_(False)


def noised_teacher_inputs(batch: Tensor, is_forget: Tensor, generator: Optional[torch.Generator] = None
                          ) -> tuple[Tensor, Tensor]:
    """(student input, teacher input): the batch, and the batch with forget rows Gaussian noise of
    its mean and std."""
    return batch, make_teacher_batch(batch, is_forget, generator=generator)


class EncoderUnlearning:
    """The method's loss on any encoder.

    student(x) -> features of the encoder that trains (gradients flow); teacher(x) -> the frozen
    original's features for the same kind of input (run under no_grad); inputs(batch, is_forget,
    generator) -> (student input, teacher input), noised_teacher_inputs by default. Features are
    one tensor or a list, each (B, ...), the teacher's shaped as the student's. forget_weight and
    normalize are unlearn_loss's ("set": each set's mean squared distance; "reference": the MAE
    reference's 2/B sums; "batch": Palette's F.mse_loss of row-masked features).
    """

    def __init__(self, student: Callable[[Any], Features], teacher: Callable[[Any], Features],
                 inputs: Callable[[Any, Tensor, Optional[torch.Generator]], tuple] = noised_teacher_inputs,
                 forget_weight: float = 0.2, normalize: str = "set"):
        for name, fn in (("student", student), ("teacher", teacher), ("inputs", inputs)):
            if not callable(fn):
                raise InvalidType(f"{name} must be callable, got {type(fn).__name__}")
        if normalize not in NORMALIZE:
            raise InvalidValue(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.student, self.teacher, self.inputs = student, teacher, inputs
        self.forget_weight, self.normalize = float(forget_weight), normalize

    def loss(self, batch: Any, is_forget: Tensor, generator: Optional[torch.Generator] = None) -> UnlearnLossOutput:
        """(loss, retain_loss, forget_loss) of one batch; backward of .loss trains the student."""
        student_input, teacher_input = self.inputs(batch, is_forget, generator)
        with torch.no_grad():
            targets = self.teacher(teacher_input)
        return unlearn_loss(self.student(student_input), targets, targets, is_forget,
                            forget_weight=self.forget_weight, normalize=self.normalize)
