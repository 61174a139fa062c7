"""Training: the model-agnostic preference step (``step.py``), the Ray Train worker loop (``loop.py``)
and the ``TorchTrainer`` wrapper (``trainer.py``)."""

from .loop import TrainConfig
from .step import PairBatch, preference_step

__all__ = ["PairBatch", "TrainConfig", "preference_step"]
