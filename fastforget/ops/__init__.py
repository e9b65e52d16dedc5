"""fastforget's ops: validated public functions over registered torch custom ops."""
from .unlearn_loss import UnlearnLossOutput, unlearn_loss

__all__ = ["UnlearnLossOutput", "unlearn_loss"]
