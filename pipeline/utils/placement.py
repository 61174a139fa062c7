"""Where a stage's Ray actors and workers may run on a cluster: custom resources and node labels from the config.

A cluster says which nodes suit which stage by giving them custom resources (a node type's ``resources:`` in
cluster.yaml, ``ray start --resources``) or labels (``labels:`` / ``ray start --labels``). The generation's model
actors (``generation.actor_resources`` / ``generation.actor_labels``) and the Ray Train workers
(``train.worker_resources`` / ``train.worker_labels``) reserve those resources and select those labels on top of the
CPUs / GPUs they already ask for; left empty, they run on any node with room (docs/jobs.md, "Placement").
"""

from __future__ import annotations

import math
from typing import Any

#: resources with fields of their own (cpus_per_actor, num_gpus_per_actor, use_gpu); the placement fields take
#: only custom ones, so that one amount is never set in two places
BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def check_placement(cfg: Any, resources: str, labels: str) -> None:
    """In a frozen config's ``__post_init__``: validate the ``resources`` field (custom resource name → a positive
    amount per actor or worker) and the ``labels`` field (node label → a value or a Ray label-selector expression
    such as ``"!spot"`` or ``"in(a10g,a100)"``), storing them as plain ``dict[str, float]`` / ``dict[str, str]``.
    Raises ``ValueError("field=value: expected …")``."""
    res = getattr(cfg, resources)
    if not isinstance(res, dict):
        raise ValueError(f"{resources}={res!r}: expected a mapping of custom resource names to amounts")
    for name, amount in res.items():
        if not isinstance(name, str) or not name or name in BUILTIN:
            raise ValueError(f"{resources}={res!r}: expected custom resource names, not {', '.join(BUILTIN)} "
                             f"(this field only places the work; CPUs and GPUs come from the stage's own settings)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount <= 0:
            raise ValueError(f"{resources}={res!r}: expected a positive number for {name!r}")
    lab = getattr(cfg, labels)
    if not isinstance(lab, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                            for k, v in lab.items()):
        raise ValueError(f"{labels}={lab!r}: expected a mapping of node label names to non-empty strings")
    object.__setattr__(cfg, resources, {k: float(v) for k, v in res.items()})
    object.__setattr__(cfg, labels, dict(lab))


def train_worker_resources(cfg: Any) -> dict[str, float] | None:
    """``ScalingConfig.resources_per_worker`` for a TrainConfig: None (Ray Train's default: 1 CPU, or 1 GPU with
    ``use_gpu``) unless custom resources are asked for, then that default plus them (Ray drops its default when
    given a mapping)."""
    if not cfg.worker_resources:
        return None
    return {**({"GPU": 1.0} if cfg.use_gpu else {"CPU": 1.0}), **cfg.worker_resources}
