"""Text-to-image and text-to-video models behind one interface (:class:`Backbone`); see docs/models.md for folder
layouts."""

from .base import Backbone, Conditioning, cat_conditioning, index_conditioning
from .cogvideox import CogVideoXBackbone
from .loader import backbone_class, load_backbone
from .sd3 import SD3Backbone
from .sdxl import SDXLBackbone
from .unet import UNetBackbone, check_model_folder
from .video import VideoBackbone
from .wan import WanBackbone

__all__ = [
    "Backbone", "Conditioning", "cat_conditioning", "index_conditioning", "backbone_class", "load_backbone",
    "CogVideoXBackbone", "SD3Backbone", "SDXLBackbone", "UNetBackbone", "VideoBackbone", "WanBackbone",
    "check_model_folder",
]
