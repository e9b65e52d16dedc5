"""The lean trainer: unlearning (the method), MAE pretraining, and the embedded demo."""
from .loop import LoopConfig
from .unlearn import PretrainConfig, UnlearnConfig, pretrain, unlearn

__all__ = ["LoopConfig", "PretrainConfig", "UnlearnConfig", "pretrain", "unlearn"]
