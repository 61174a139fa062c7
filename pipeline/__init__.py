"""Preference optimization of text-to-image diffusion models on Ray.

Data flows through the sub-packages in this order: ``toyworld`` (the embedded default world), data
generation, ``objectives`` (pure loss math), training, evaluation. See README.md and docs/.
"""

__version__ = "0.1.0"
