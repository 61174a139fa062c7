"""Training: the preference step (``step.py``), the one engine around it (``engine.py``), the reference the
trainer owns (``reference.py``), the Ray Train worker (``worker.py``) and the ``TorchTrainer`` wrapper
(``trainer.py``)."""

from .config import TrainConfig
from .engine import PairData, PairSampler, TrainEngine, TrainingDiverged, train_in_process
from .step import PairBatch, preference_step

__all__ = ["PairBatch", "PairData", "PairSampler", "TrainConfig", "TrainEngine", "TrainingDiverged", "preference_step",
           "train_in_process"]
