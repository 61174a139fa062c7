"""Training: the preference step (``step.py``), the one engine around it (``engine.py``), the reference the
trainer owns (``reference.py``), the Ray Train worker (``worker.py``) and the ``TorchTrainer`` wrapper
(``trainer.py``); FSDP2 sharding is applied by functions in ``parallel.py``.

The names below load on first use: Ray Train's controller imports this package to unpickle the metrics
callback (``tracking.py``), and it needs neither torch nor the models the engine imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {"TrainConfig": ".config", "PairData": ".engine", "PairSampler": ".engine", "TrainEngine": ".engine",
            "TrainingDiverged": ".engine", "train_in_process": ".engine", "PairBatch": ".step",
            "preference_step": ".step"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import TrainConfig
    from .engine import PairData, PairSampler, TrainEngine, TrainingDiverged, train_in_process
    from .step import PairBatch, preference_step


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
