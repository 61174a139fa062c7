"""Compose the Ray Data stages into one preference-data generation run.

    prompts ─▶ [perturb c→c⁻] ─▶ [K seeds per prompt] ─▶ generate (actor pool) ─▶ [score (actor pool)] ─▶ pairs ─▶ Parquet

Strategies:

* ``onpolicy`` — K rollouts per prompt from the given model, scored by the reward, best-vs-worst (or all)
  pairs above a reward gap; per-prompt statistics are kept.
* ``ddspo-paired`` — the frozen model renders c and c⁻ with the same seed; label-free pairs.
* ``rand-positive`` / ``not-paired`` — DDSPO without negative images: only winners are rendered, the
  loser image is borrowed from another prompt in its group (see :func:`pairing.pairs_borrowing_losers`).

The output folder is written atomically with a completion marker and a manifest holding the config; a
rerun with the same config returns the finished dataset untouched, a rerun with another config refuses
to overwrite it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.context import ShuffleStrategy

from ..config import absolute_paths, differences, fingerprint, sections, to_dict
from ..sampling import SamplerConfig
from ..toyworld.reference import REFERENCE_DIR
from ..utils.atomic import NotOurOutput, atomic_directory, check_replaceable, is_complete
from ..utils.placement import check_placement
from . import pairing, stages
from .perturb import PERTURBATIONS
from .schema import GENERATED_STRATEGIES, MANIFEST, folder_checksums, scan_pairs

PARQUET_DIR = "pairs"
LIGHT_STAGE_CPUS = 0.25
ROWS_PER_PARTITION = 512
PLACEMENT = ("actor_resources", "actor_labels")  # GenerationConfig fields that only say where actors run
# GenerationConfig fields that only say how many actors run and how far Ray Data reads ahead: not the pairs
POOLS = ("num_actors", "generation_pool", "reward_pool", "object_store_mb")


@dataclass(frozen=True)
class PoolConfig:
    """An actor pool's bounds: Ray Data starts ``min_size`` actors and adds more, up to ``max_size``, while inputs
    wait for one (and lets idle ones go); equal bounds make a fixed pool. Why bounds rather than a size: a cluster's
    generation and reward stages need different widths, and an autoscaling pool takes the GPUs it can use."""

    min_size: int = 1
    max_size: int = 1

    def __post_init__(self):
        if self.min_size < 1:
            raise ValueError(f"min_size={self.min_size!r}: expected >= 1")
        if self.max_size < self.min_size:
            raise ValueError(f"max_size={self.max_size!r}: expected >= min_size ({self.min_size})")

    def strategy(self, initial: int | None = None) -> ray.data.ActorPoolStrategy:
        start = self.min_size if initial is None else min(max(initial, self.min_size), self.max_size)
        return ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size, initial_size=start)


@dataclass(frozen=True)
class GenerationConfig:
    model: str = str(REFERENCE_DIR)
    weights: str = ""  # a trained denoiser (denoiser.safetensors) to sample from instead of the folder's
    lora_rank: int = 0  # the LoRA rank those weights were trained with (0: full fine-tuning)
    prompts: str = "toy:train"  # a .txt / .parquet file or toy:train | toy:heldout | toy:all
    prompt_limit: int = 0
    prompt_repeat: int = 1
    strategy: str = "onpolicy"
    perturb: str = "rand-removal"
    llm_path: str = ""
    llm_task: str = "alignment"
    samples_per_prompt: int = 4
    pairing: str = "best-worst"
    min_reward_gap: float = 0.0
    reward: Any = field(default_factory=lambda: {"name": "toy"})
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    batch_size: int = 32
    # generation actors: a fixed pool of this size, or with generation_pool the actors started (clamped into its bounds)
    num_actors: int = 1
    generation_pool: PoolConfig | None = None  # the generation actors' min/max (autoscaling); None: num_actors, fixed
    reward_pool: PoolConfig = field(default_factory=PoolConfig)  # the reward model actors' min/max (on-policy)
    # object store (MiB) this run's Ray Data execution may fill ahead of its consumers (backpressure; 0: Ray's default)
    object_store_mb: int = 0
    num_gpus_per_actor: float = -1.0  # -1: one GPU per model actor when the cluster has GPUs, else 0
    cpus_per_actor: float = 0.5  # CPUs a model actor reserves (its torch threads may use more)
    torch_threads: int = 0  # 0: leave Ray's default (one thread per reserved CPU)
    # placement of the model actors (generation, scoring, LLM perturbation) on a cluster: custom resources each
    # reserves and node labels it selects (pipeline/utils/placement.py); empty = any node with the CPUs/GPUs
    actor_resources: dict[str, float] = field(default_factory=dict)
    actor_labels: dict[str, str] = field(default_factory=dict)
    group_size: int = 16  # prompts per loser-borrowing group (efficient DDSPO strategies)
    seed: int = 0
    round: int = 0
    policy_version: str = "reference"
    write_png: bool = True

    def __post_init__(self):
        sections(self, sampler=SamplerConfig, generation_pool=PoolConfig, reward_pool=PoolConfig)
        absolute_paths(self, "model", "weights", "prompts", "llm_path", "reward")
        checks = [
            ("strategy", self.strategy in GENERATED_STRATEGIES, f"one of {GENERATED_STRATEGIES}"),
            ("perturb", self.perturb in PERTURBATIONS, f"one of {PERTURBATIONS}"),
            ("pairing", self.pairing in ("best-worst", "all"), "'best-worst' or 'all'"),
            ("samples_per_prompt", self.samples_per_prompt >= 2 or self.strategy != "onpolicy", ">= 2 for onpolicy"),
            ("samples_per_prompt", self.samples_per_prompt >= 1, ">= 1"),
            ("prompt_limit", self.prompt_limit >= 0, ">= 0 (0 = all)"),
            ("prompt_repeat", self.prompt_repeat >= 1, ">= 1"),
            ("lora_rank", self.lora_rank >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("num_actors", self.num_actors >= 1, ">= 1"),
            ("object_store_mb", self.object_store_mb >= 0, ">= 0 (0 = Ray Data's default)"),
            ("cpus_per_actor", self.cpus_per_actor > 0, "> 0"),
            ("group_size", self.group_size >= 2, ">= 2"),
            ("min_reward_gap", self.min_reward_gap >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")
        check_placement(self, "actor_resources", "actor_labels")

    @property
    def prompts_per_batch(self) -> int:
        """Prompts in one generation batch: an on-policy row holds K rollouts, so a batch holds about ``batch_size``
        rollouts."""
        return max(1, self.batch_size // self.samples_per_prompt) if self.strategy == "onpolicy" else self.batch_size

    @property
    def generation_bounds(self) -> PoolConfig:
        """The generation pool's bounds: ``generation_pool``, else a fixed pool of ``num_actors``."""
        return self.generation_pool or PoolConfig(self.num_actors, self.num_actors)

    def fingerprint(self) -> str:
        """The dataset's identity. The placement and pool fields are left out: where and how many actors run, and
        how far Ray Data reads ahead, do not change the pairs (tests/test_multinode.py and
        tests/test_generation_pools.py check them), so a rerun on other resources finds its dataset."""
        return fingerprint({k: v for k, v in to_dict(self).items() if k not in PLACEMENT + POOLS})

    def same_pairs(self, recorded: dict) -> bool:
        """Whether a manifest's recorded config (``to_dict`` of a config, possibly from before some fields existed)
        makes the same pairs as this one: equal in every field but placement and pools. Datasets made when
        ``num_actors`` was still part of the fingerprint match this way."""
        diffs = differences({k: v for k, v in recorded.items() if k not in PLACEMENT + POOLS},
                            {k: v for k, v in to_dict(self).items() if k not in PLACEMENT + POOLS})
        return not diffs


def _gpus(cfg: GenerationConfig) -> float:
    if cfg.num_gpus_per_actor >= 0:
        return cfg.num_gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_dataset(cfg: GenerationConfig) -> ray.data.Dataset:
    """The lazy Ray Data pipeline for one config (nothing runs until it is consumed)."""
    from .prompts import load_prompts

    bounds = cfg.generation_bounds
    pool = bounds.strategy(initial=cfg.num_actors)
    gpus = _gpus(cfg)
    # where the model actors may run (None: anywhere); the light stages go wherever there is room
    place = dict(resources=cfg.actor_resources or None, label_selector=cfg.actor_labels or None)
    # Light stages reserve a quarter CPU: with Ray's default of one CPU per task, model actors holding
    # their reservation on a small machine would leave no room for the stages that feed them (deadlock).
    light = dict(num_cpus=LIGHT_STAGE_CPUS)
    prompts = load_prompts(cfg.prompts, limit=cfg.prompt_limit, repeat=cfg.prompt_repeat)
    # The loser-borrowing groupby defaults to 200 partitions: hundreds of tasks for a few hundred rows. Size
    # them to the data instead, about ROWS_PER_PARTITION rows each.
    parts = max(1, min(200, len(prompts) // ROWS_PER_PARTITION))
    per_batch = cfg.prompts_per_batch
    # A block of prompts is one generation task's work, and its images one output block in the object store: a
    # block per batch keeps that output a batch's size however many prompts the run has (with a fixed number of
    # blocks the object store's peak grew with the run, bench/results/rollouts.md), and every model actor the pool
    # may grow to gets a few blocks to work on.
    blocks = max(parts, 4 * bounds.max_size, -(-len(prompts) // per_batch))
    ds = ray.data.from_items(prompts, override_num_blocks=min(len(prompts), blocks))
    # The loser-borrowing groupby shuffles with plain tasks: Ray Data's default shuffle starts actors of its own
    # for every run, a fixed cost larger than the shuffle of a few thousand rows (docs/scale.md)
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # pairs leave in prompt order (a groupby's: in group order), so a rerun writes identical files, with no sort
    ds.context.execution_options.preserve_order = True
    if cfg.object_store_mb:  # backpressure: the whole run (every dataset derived from this one) shares this context
        options = ds.context.execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=cfg.object_store_mb << 20)

    if cfg.strategy in ("ddspo-paired", "not-paired"):  # strategies that need c⁻ of the prompt itself
        if cfg.perturb == "llm":
            ds = ds.map_batches(stages.PerturbPrompts, batch_size=cfg.batch_size, num_cpus=cfg.cpus_per_actor,
                                compute=ray.data.ActorPoolStrategy(size=1), **place,
                                fn_constructor_kwargs=dict(method="llm", seed=cfg.seed, llm_path=cfg.llm_path,
                                                           llm_task=cfg.llm_task))
        else:
            ds = ds.map_batches(pairing.perturb_batch, batch_size=cfg.batch_size, **light,
                                fn_kwargs=dict(method=cfg.perturb, seed=cfg.seed))

    generate = dict(batch_size=per_batch, compute=pool, num_cpus=cfg.cpus_per_actor, num_gpus=gpus, **place)
    gen_kwargs = dict(model=cfg.model, sampler=asdict(cfg.sampler), torch_threads=cfg.torch_threads,
                      write_png=cfg.write_png, weights=cfg.weights, lora_rank=cfg.lora_rank)

    if cfg.strategy == "onpolicy":
        # One row per prompt with its K samples, from seeds to pairs: no shuffle gathers a prompt's rollouts, so the
        # run streams (bench/results/rollouts.md).
        ds = ds.map(pairing.sample_seeds, fn_kwargs=dict(samples_per_prompt=cfg.samples_per_prompt,
                                                         seed=cfg.seed, round_=cfg.round), **light)
        ds = ds.map_batches(stages.GenerateImages, fn_constructor_kwargs=dict(columns={"": "prompt"}, **gen_kwargs),
                            **generate)
        ds = ds.map_batches(stages.ScoreImages, batch_size=per_batch, compute=cfg.reward_pool.strategy(),
                            num_cpus=LIGHT_STAGE_CPUS, num_gpus=gpus, **place, fn_constructor_kwargs=dict(reward=cfg.reward))
        return ds.map_batches(pairing.pairs_from_prompts, batch_size=per_batch, **light,
                              fn_kwargs=dict(pairing=cfg.pairing, min_gap=cfg.min_reward_gap, round_=cfg.round,
                                             policy_version=cfg.policy_version))

    ds = ds.map(pairing.add_seed_and_group, fn_kwargs=dict(seed=cfg.seed, round_=cfg.round, group_size=cfg.group_size),
                **light)
    if cfg.strategy == "ddspo-paired":
        ds = ds.map_batches(stages.GenerateImages,
                            fn_constructor_kwargs=dict(columns={"_w": "prompt", "_l": "perturbed_prompt"}, **gen_kwargs),
                            **generate)
        return ds.map_batches(pairing.pairs_from_ddspo, batch_size=cfg.batch_size, **light,
                              fn_kwargs=dict(round_=cfg.round, policy_version=cfg.policy_version))
    ds = ds.map_batches(stages.GenerateImages, fn_constructor_kwargs=dict(columns={"": "prompt"}, **gen_kwargs),
                        **generate)
    return ds.groupby("group", num_partitions=parts).map_groups(
        pairing.pairs_borrowing_losers, fn_kwargs=dict(strategy=cfg.strategy, seed=cfg.seed, round_=cfg.round,
                                                      policy_version=cfg.policy_version), **light)


def rollout_pairs_in_process(cfg: GenerationConfig, generate_stage, score_stage) -> pa.Table:
    """The on-policy pipeline's work in this process, batch by batch as :func:`build_dataset` batches it, through the
    given stage objects (``stages.GenerateImages``, ``stages.ScoreImages``): the baseline that bench/rollouts.py and
    bench/fixed_costs.py hold the Ray pipeline against. The pairs come back in ``pair_id`` order."""
    from .prompts import load_prompts

    rows = [pairing.sample_seeds(p, samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed, round_=cfg.round)
            for p in load_prompts(cfg.prompts, limit=cfg.prompt_limit, repeat=cfg.prompt_repeat)]
    tables = []
    for start in range(0, len(rows), cfg.prompts_per_batch):
        chunk = rows[start:start + cfg.prompts_per_batch]
        batch = {c: np.array([r[c] for r in chunk], dtype=object if c == "prompt" else None) for c in chunk[0]}
        tables.append(pairing.pairs_from_prompts(score_stage(generate_stage(batch)), pairing=cfg.pairing,
                                                 min_gap=cfg.min_reward_gap, round_=cfg.round,
                                                 policy_version=cfg.policy_version))
    return pa.concat_tables(tables).sort_by("pair_id")


def existing_output(cfg: GenerationConfig, out: str | Path) -> dict | None:
    """The manifest of a finished dataset at ``out`` made with this config, ``None`` when ``out`` is absent or
    empty; anything else at ``out`` is refused (a dataset of another config, another output, a user's files).
    Cheap: jobs call it before starting Ray."""
    out = Path(out)
    if is_complete(out):
        if not (out / MANIFEST).is_file():
            raise NotOurOutput(f"{out} is a finished output of this project but not a pairs dataset (no {MANIFEST}); "
                               f"choose another --out")
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest["fingerprint"] == cfg.fingerprint() or cfg.same_pairs(manifest.get("config", {})):
            return manifest
        from ..utils.run_record import describe

        raise FileExistsError(f"{out} holds a finished dataset made with another config "
                              f"({describe(differences(manifest.get('config', {}), to_dict(cfg)))}); "
                              f"choose another --out")
    check_replaceable(out)
    return None


def generate(cfg: GenerationConfig, out: str | Path) -> dict:
    """Run the pipeline into ``out`` (atomically); returns the manifest. Idempotent for the same config.

    ``out`` must be absent, empty, or a finished dataset of this project: anything else is refused before
    any work starts and left untouched (:func:`existing_output`).
    """
    out = Path(out).absolute()  # Ray's workers write it, and their working directory is not this process's
    manifest = existing_output(cfg, out)
    if manifest is not None:
        return {**manifest, "skipped": True}
    from ..utils.progress import Stage, emit, watch_data_operator
    from .prompts import load_prompts

    t0 = time.time()
    n_prompts = len(load_prompts(cfg.prompts, limit=cfg.prompt_limit, repeat=cfg.prompt_repeat))
    onpolicy = cfg.strategy == "onpolicy"
    total, unit = (n_prompts * cfg.samples_per_prompt, "rollouts") if onpolicy else (n_prompts, "prompts")
    name = f"round {cfg.round} · generate"
    emit(f"{name} · {n_prompts} prompts × {cfg.samples_per_prompt} samples = {total} rollouts" if onpolicy else
         f"{name} · {n_prompts} prompts ({cfg.strategy})")
    stage = Stage(name, total, unit)
    per_row = cfg.samples_per_prompt if onpolicy else 1  # an on-policy row is a prompt's K rollouts
    with atomic_directory(out, marker=True) as tmp, watch_data_operator("GenerateImages", stage, per_row):
        # a file per block that reaches the writer (a generation batch's pairs): a minimum number of rows per file
        # would make the writer hold that many pairs in the object store
        build_dataset(cfg).write_parquet(str(tmp / PARQUET_DIR))
        if not (tmp / PARQUET_DIR).is_dir():  # Ray Data writes no folder for an empty dataset
            raise ValueError(f"{out}: no pairs were made from {n_prompts} prompts (strategy {cfg.strategy!r}, "
                             f"pairing {cfg.pairing!r}, min_reward_gap {cfg.min_reward_gap}): every prompt's "
                             "samples tied; use more samples_per_prompt or a smaller min_reward_gap")
        # validate what was written (schema, finite values) before marking it, one batch in memory at a time
        stats = _PairStatistics()
        info = scan_pairs(tmp / PARQUET_DIR, on_batch=stats.add)
        stage.close(f"{info.num_rows} pairs", done=total)
        manifest = {
            "fingerprint": cfg.fingerprint(), "config": asdict(cfg), "num_pairs": info.num_rows,
            "num_prompts": len(stats.prompts), "seconds": round(time.time() - t0, 2),
            "parquet_dir": PARQUET_DIR, "files": folder_checksums(tmp / PARQUET_DIR),
        }
        if cfg.strategy == "onpolicy" and info.num_rows:
            manifest.update(stats.means())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return {**manifest, "skipped": False}


class _PairStatistics:
    """The manifest's data statistics, accumulated over the validated batches: the prompts, and for the round
    table the mean reward gap, mean prompt reward and mean winner–loser RMS distance (latent units)."""

    def __init__(self):
        self.prompts: set[str] = set()
        self.n = self.gap = self.prompt_reward = self.distance = 0.0

    def add(self, b) -> None:
        rows = b.num_rows
        self.prompts.update(b.column("prompt").to_pylist())
        lw, ll = (np.asarray(b.column(c).combine_chunks().flatten(), dtype=np.float32).reshape(rows, -1)
                  for c in ("latent_w", "latent_l"))
        self.n += rows
        self.gap += float((b.column("reward_w").to_numpy() - b.column("reward_l").to_numpy()).sum())
        self.prompt_reward += float(b.column("prompt_reward_mean").to_numpy().sum())
        self.distance += float(np.sqrt(((lw - ll) ** 2).mean(1)).sum())

    def means(self) -> dict:
        return {"mean_reward_gap": self.gap / self.n, "mean_prompt_reward": self.prompt_reward / self.n,
                "mean_pair_distance": self.distance / self.n}
