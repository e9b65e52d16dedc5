"""`bench step`'s reference and pytorch providers, one module per model family: each re-creates
its reference code's unlearning step (reference) and writes it as good plain PyTorch (pytorch).
A module gives

- baseline_step(spec, model, images, is_forget, plain) -> step(): one provider's step on a batch;
- flops(model, spec): the method's FLOPs a step (student forward and backward, one teacher
  forward), the same for every provider;
- options(spec): the family's method options for the trainer's own step (UnlearnConfig fields).
"""
import importlib

LR = 1e-4  # every provider's learning rate: a step's cost does not depend on it


def of(family: str):
    """The providers' module of a family (fastforget.families' name)."""
    return importlib.import_module(f"{__name__}.{family}")
