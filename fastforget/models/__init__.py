"""Models: MAE (facebookresearch/mae's keys and semantics) and Palette (guided-diffusion's UNet as
jpmorganchase's Palette fork configures it), on fastforget's ops."""
from .mae import CONFIGS, MaskedAutoencoderViT, create_mae, load_mae
from .palette import CONFIGS as PALETTE_CONFIGS
from .palette import Palette, create_palette, load_palette

__all__ = ["CONFIGS", "MaskedAutoencoderViT", "create_mae", "load_mae", "PALETTE_CONFIGS", "Palette",
           "create_palette", "load_palette"]
