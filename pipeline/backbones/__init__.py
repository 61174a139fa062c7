"""Text-to-image and text-to-video models behind one interface (:class:`Backbone`); see docs/models.md for folder
layouts.

The video families (``WanBackbone``, ``CogVideoXBackbone``) load on first use: every Ray worker imports this
package, and they pull in diffusers' video pipelines and their text encoders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .base import Backbone, Conditioning, cat_conditioning, index_conditioning
from .loader import backbone_class, load_backbone
from .sd3 import SD3Backbone
from .sdxl import SDXLBackbone
from .unet import UNetBackbone, check_model_folder
from .video import VideoBackbone

_LAZY = {"WanBackbone": ".wan", "CogVideoXBackbone": ".cogvideox"}

if TYPE_CHECKING:
    from .cogvideox import CogVideoXBackbone
    from .wan import WanBackbone

__all__ = [
    "Backbone", "Conditioning", "cat_conditioning", "index_conditioning", "backbone_class", "load_backbone",
    "CogVideoXBackbone", "SD3Backbone", "SDXLBackbone", "UNetBackbone", "VideoBackbone", "WanBackbone",
    "check_model_folder",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
