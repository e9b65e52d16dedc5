"""Models: MAE (facebookresearch/mae's keys and semantics) on fastforget's ops."""
from .mae import CONFIGS, MaskedAutoencoderViT, create_mae, load_mae

__all__ = ["CONFIGS", "MaskedAutoencoderViT", "create_mae", "load_mae"]
