"""Checkpointing as a component: the engine's state as a sharded ``torch.distributed.checkpoint`` (DCP) folder.

Every rank writes its own shards of the weights, the AdamW moments and the EMA (``__<rank>_0.distcp``; rank 0
adds DCP's ``.metadata``), so no rank ever gathers the full model or optimizer — the gather that made every
save of a large model cost a full copy on rank 0. Beside the shards:

* ``rank_<r>.pt`` — rank r's noise generator, torch RNG and data position (small; ``weights_only`` loads);
* ``training_state.json`` — the step and the number of workers that wrote the checkpoint;
* ``history.json`` / ``metrics.json`` — every logged window up to this step, and this step's metrics.

Ray Train V2 merges the folders every worker reports into one checkpoint folder, so the files above sit
side by side in storage. Loading reshards: DCP reads each rank's slice of every tensor whatever the number of
workers that wrote it, so a run resumes onto more or fewer workers (the data position is carried over as
the number of pairs consumed in the epoch, and the ranks' RNGs are reseeded from the step); with the same
number of workers it resumes bit-identically. :func:`load_full` reads chosen parts as full tensors in one
process, without a process group (the exported policy, a round's optimizer carry-over).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

STATE_FILE = "training_state.json"
HISTORY_FILE = "history.json"  # every logged window's metrics up to this checkpoint (survives resumes)
METRICS_FILE = "metrics.json"


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank}.pt"


def _sharded(state: dict) -> dict:
    """The tensors DCP writes and reads: the model, the optimizer and the EMA, as the engine holds them."""
    return {"model": state["model"], "optim": state["optimizer"], "ema": state["ema"] or {}}


def save_checkpoint(engine, folder: str | Path, metrics: dict) -> None:
    """Write the engine's state into ``folder`` (a collective under FSDP2: every rank calls it with its own
    folder — Ray Train merges them — or all with the same one)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = engine.state_dict()
    # One worker writes without collectives: a distributed save on a one-rank gloo group leaves the rank's
    # later training steps slower (bench/results/checkpoint_pause.md); the folder is the same either way.
    dcp.save(_sharded(state), checkpoint_id=str(folder), no_dist=engine.world == 1)
    torch.save({"generator": state["generator"], "torch_rng": state["torch_rng"], "sampler": state["sampler"]},
               _rank_file(folder, engine.rank))
    if engine.rank == 0:
        (folder / STATE_FILE).write_text(json.dumps({"step": state["step"], "world": engine.world}))
        (folder / HISTORY_FILE).write_text(json.dumps(state["history"]))
        (folder / METRICS_FILE).write_text(json.dumps(metrics))


def load_checkpoint(engine, folder: str | Path, data=None) -> None:
    """Restore the engine from ``folder``, resharding onto this run's workers (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    meta = json.loads((folder / STATE_FILE).read_text())
    state = engine.state_dict()  # this run's shapes and shards (the optimizer's state initialised)
    tensors = _sharded(state)
    dcp.load(tensors, checkpoint_id=str(folder))
    same_world = int(meta["world"]) == engine.world and _rank_file(folder, engine.rank).exists()
    own = torch.load(_rank_file(folder, engine.rank if same_world else 0), weights_only=True)
    sampler = own["sampler"]
    if sampler is not None and not same_world:  # the pairs consumed in this epoch, spread over the new ranks
        sampler = {**sampler, "offset": int(sampler["offset"]) * int(meta["world"]) // engine.world}
    history = folder / HISTORY_FILE
    engine.load_state_dict({
        "model": tensors["model"], "optimizer": tensors["optim"], "ema": tensors["ema"] or None,
        "step": int(meta["step"]), "history": json.loads(history.read_text()) if history.exists() else [],
        "generator": own["generator"] if same_world else None, "torch_rng": own["torch_rng"] if same_world else None,
        "sampler": sampler,
    }, data)
    if not same_world:
        engine.reseed()


def load_full(folder: str | Path, parts: set[str]) -> dict:
    """Chosen parts (``"model"``, ``"optim"``, ``"ema"``) of a checkpoint as full CPU tensors, in this process."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint written by pipeline/training/checkpoint.py "
                                f"(no DCP .metadata)")
    with warnings.catch_warnings():  # reading in one process, on purpose: DCP's note that it assumes so is noise
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        loaded = _load_state_dict_from_keys(set(parts), checkpoint_id=str(folder))
    return {part: loaded.get(part, {}) for part in parts}


def checkpoint_history(folder: str | Path) -> list[dict]:
    """Every report's metrics up to this checkpoint."""
    path = Path(folder) / HISTORY_FILE
    return json.loads(path.read_text()) if path.exists() else []
