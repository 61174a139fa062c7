"""Text-to-image models behind one interface (:class:`Backbone`); see docs/models.md for folder layouts."""

from .base import Backbone, Conditioning, cat_conditioning, index_conditioning
from .loader import backbone_class, load_backbone
from .sd3 import SD3Backbone
from .sdxl import SDXLBackbone
from .unet import UNetBackbone, check_model_folder

__all__ = [
    "Backbone", "Conditioning", "cat_conditioning", "index_conditioning", "backbone_class", "load_backbone",
    "SD3Backbone", "SDXLBackbone", "UNetBackbone", "check_model_folder",
]
