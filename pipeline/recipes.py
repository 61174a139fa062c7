"""Named recipes: complete, tuned run configs — the one place that holds the jobs' numeric defaults.

A recipe is a partial config tree (a mapping) merged over the dataclass defaults; a job starts from its
default recipe, a ``--config`` file merges over it and ``--set`` overrides go last (``pipeline/cli.py``).
``python jobs/iterative_sipo.py --print-config`` shows the resolved tree. A shipped config file under ``configs/``
is such an overlay: ``configs/toy_video.yaml`` turns the default recipe into rounds on the toy video world (its
model, prompts, reward and sizes; the objective stays this module's).

Why these numbers: README (the embedded default's measured result), docs/jobs.md (the sweep's budget),
bench/results/generation.md (two single-threaded generation actors beat one two-threaded actor on 2 cores).
"""

from __future__ import annotations

import copy
from typing import Any

#: One online round on the toy world, the first embedded default (kept: bench/rounds.py, bench/one_round.py and the
#: claims report measure against it): every prompt of the toy training split, 4 rollouts each, every pair whose
#: reward gap exceeds 0.1; SIPO with β = 20000 (at the preset's β = 1000 both residuals climb: SIPO Fig. 8c's
#: small-β drift), lr 5e-5, 150 steps, weight EMA 0.98; 48 held-out prompts × 4 seeds.
TOY_ONE_ROUND: dict[str, Any] = {
    "rounds": 1,
    "generation": {"prompts": "toy:train", "prompt_limit": 168, "samples_per_prompt": 4, "pairing": "all",
                   "min_reward_gap": 0.1, "batch_size": 64, "num_actors": 2,
                   "sampler": {"num_steps": 10, "guidance_scale": 3.0, "eta": 1.0, "batch_size": 64}},
    "train": {"objective": {"name": "sipo", "beta": 20000.0}, "lr": 5e-5, "max_steps": 150, "batch_size": 8,
              "log_every": 10, "checkpoint_every": 50, "ema_decay": 0.98, "torch_threads": 2},
    "eval": {"prompts": "toy:heldout", "num_prompts": 48, "samples": 4},
}

#: The embedded default of jobs/iterative_sipo.py: three online rounds of SIPO at β = 500 and lr 2e-4 with the
#: SDPO safeguard (μ = 0.9, the authors' SD 1.5 value) and AdamW's state carried from round to round; otherwise
#: TOY_ONE_ROUND. Why (docs/rounds.md, bench/results/rounds.md): β 500 at lr 2e-4 is the first setting whose
#: rounds move the policy, and without the safeguard it does so by denoising worse (speckled images, the
#: training prompts' reward falling); a fresh optimizer each round takes back part of the previous round. The
#: held-out evaluation samples with the rollouts' sampler (10 steps): the policy is judged on the images it is
#: trained to make, in about half the time of 20 steps (README: the three rounds still take more than 10 minutes).
TOY_ROUNDS: dict[str, Any] = {
    **TOY_ONE_ROUND,
    "rounds": 3,
    "carry_optimizer": True,
    "train": {**TOY_ONE_ROUND["train"], "lr": 2e-4,
              "objective": {"name": "sipo", "beta": 500.0, "safeguard": {"mu": 0.9}}},
    "eval": {**TOY_ONE_ROUND["eval"], "sampler": dict(TOY_ONE_ROUND["generation"]["sampler"])},
}

#: The sweep's default (jobs/sweep.py): round 0 of a shortened TOY_ONE_ROUND (96 prompts, 100 steps) as 2
#: segments, a 2×2 grid over μ (null = the safeguard off) and β, each segment scored on 16 held-out prompts ×
#: 2 seeds, so that the sweep fits about 10 minutes on a 2-core machine. ``prompt_limit`` keeps a split's first N
#: prompts, listed colour by colour: these 96 hold no cyan, blue or magenta prompt, the 16 held-out ones only cyan
#: and yellow of the split's four colours (docs/rounds.md).
TOY_SWEEP: dict[str, Any] = {
    "rounds": {**TOY_ONE_ROUND, "generation": {**TOY_ONE_ROUND["generation"], "prompt_limit": 96},
               "train": {**TOY_ONE_ROUND["train"], "max_steps": 100}},
    "trial": {"eval": {"num_prompts": 16, "samples": 2}},
    "search": "grid",
    "grid": {"mu": [None, 0.5], "beta": [5000.0, 20000.0]},
    "space": {"mu": [0.0, 0.99], "beta": [1000.0, 100000.0], "epsilon": [0.05, 0.3]},
    "segments": 2,
    "grace_period": 1,
    "reduction_factor": 2,
}

#: jobs/train.py and jobs/generate_pairs.py start from the dataclass defaults (the shipped toy reference).
RECIPES: dict[str, dict[str, Any]] = {
    "toy-rounds": TOY_ROUNDS,
    "toy-one-round": TOY_ONE_ROUND,
    "toy-sweep": TOY_SWEEP,
    "defaults": {},
}
#: The config tree each recipe is written for: a rounds recipe also configures jobs/generate_pairs.py and
#: jobs/train.py through its ``generation`` and ``train`` sections (round 0's, before the round's own fields).
TREES: dict[str, str] = {"toy-rounds": "rounds", "toy-one-round": "rounds", "toy-sweep": "sweep", "defaults": ""}


def recipe(name: str, section: str = "") -> dict[str, Any]:
    """A deep copy of a named recipe, or of one ``section`` of a rounds recipe (``generation``, ``train``)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    data = copy.deepcopy(RECIPES[name])
    return data.get(section, {}) if section else data


def recipes_for(tree: str, section: str = "") -> list[str]:
    """The recipes a job may start from: those of its tree (``rounds``, ``sweep``), or the rounds recipes for a
    job configured by one section of them; ``defaults`` always."""
    want = "rounds" if section else tree
    return sorted(name for name, kind in TREES.items() if kind in ("", want))
