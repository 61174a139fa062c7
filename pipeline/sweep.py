"""Ray Tune sweeps over the SDPO slack μ, the preference β and the SIPO clip ε, with ASHA early stopping.

A sweep tunes round 0 of an online run (a ``RoundsConfig``, see :mod:`.rounds`): the reference's pairs
are generated once, up front, and shared by every trial. Each trial is a Ray Tune function that drives
Ray Train (the Train V2 + Tune pattern: the trial constructs and fits a ``TorchTrainer``, here through
:func:`.training.trainer.run_training`) in ``segments``: a segment trains ``steps_per_segment`` more
optimizer steps (one fit that resumes the trial's Train run from its latest checkpoint), evaluates the
policy's held-out reward like the rounds do, and ``ray.tune.report``\\ s it with a Tune checkpoint (the
segment index; the model state lives in the Train run). ASHA stops bad trials between segments.

Output folder::

    out/pairs/                   the shared pairs dataset (idempotent, see data/generate.py)
    out/reference_eval/          the starting model's held-out reward (the baseline every trial is paired with)
    out/trials/<id>/segment_<k>/ eval.json, grid.png of each trial's policy after segment k
    out/trials/<id>/tensorboard/ the trial's per-step training metrics (every train.log_every steps)
    out/tune/                    Ray Tune's experiment (rerunning the sweep resumes it)
    out/train/trial_<id>/        each trial's Ray Train run (removed at the end unless keep_train_runs)
    out/results.csv, results.md  one row per trial
    out/reward_vs_hparams.png    final reward against each swept hyperparameter
    out/best_config.yaml         the RoundsConfig with the best trial's values, for jobs/iterative_sipo.py

Resources: a trial's driver reserves ``trial_cpus`` (default 0: it only waits on Train and evaluates
between segments) plus a little ``memory`` so its placement group is not empty; each Train worker reserves
Ray Train's default (1 CPU, or 1 GPU). ``max_concurrent`` (0 = auto) caps running trials at what the
cluster can train at once, so no trial holds a driver while its workers wait forever.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from .config import ConfigError, absolute_paths, build, merge, sections, to_dict
from .export import policy_from_checkpoint
from .reporting import csv_table, fmt_ci, fmt_num, markdown_table
from .rounds import RoundsConfig, evaluate_policy, load_eval
from .stats import win_rate
from .utils.atomic import atomic_directory, atomic_write_bytes, is_complete
from .utils.plots import plot_scatter_panels
from .utils.run_record import guard_run_dir

METRIC = "reward"
#: swept name → its dotted path in the RoundsConfig tree (mu = None: the safeguard off)
PARAMS = {"mu": "train.objective.safeguard.mu", "beta": "train.objective.beta", "epsilon": "train.objective.epsilon"}
LOG_SCALE = {"beta"}  # searched (and plotted) on a log scale
TRIAL_MEMORY = 256 * 2**20  # bytes of Ray's logical "memory" a trial driver reserves (a non-empty bundle)
#: fields a rerun into the same sweep folder may change (resources only)
RESUMABLE = ("max_concurrent", "trial_cpus", "threads", "keep_train_runs", "rounds.train.worker_resources",
             "rounds.train.worker_labels", "rounds.generation.actor_resources", "rounds.generation.actor_labels")


@dataclass(frozen=True)
class SweepConfig:
    rounds: RoundsConfig = field(default_factory=RoundsConfig)  # the online run whose round 0 is tuned
    trial: dict = field(default_factory=dict)  # a partial RoundsConfig tree for the trials only (not in best_config.yaml)
    search: Literal["grid", "optuna"] = "grid"
    grid: dict = field(default_factory=lambda: {"mu": [0.0, 0.5], "beta": [1000.0, 3000.0]})
    space: dict = field(default_factory=lambda: {"mu": [0.0, 0.99], "beta": [100.0, 10000.0], "epsilon": [0.05, 0.3]})
    num_samples: int = 0  # grid: repeats of the grid (0 = 1); optuna: trials (0 = 4)
    segments: int = 2  # ASHA's max_t: reports per trial (each one is a Ray Train fit + a held-out evaluation)
    steps_per_segment: int = 0  # 0: the tuned run's train.max_steps / segments
    grace_period: int = 1  # segments before ASHA may stop a trial
    reduction_factor: float = 2.0  # ASHA keeps the top 1/reduction_factor at each rung
    max_concurrent: int = 0  # 0: as many trials as the cluster can train at once
    trial_cpus: float = 0.0  # CPUs a trial's driver reserves (it evaluates between segments)
    threads: int = 0  # torch threads of a trial's training worker and evaluation (0: the cluster's CPUs / concurrent
    #                   trials; a `trial.train.torch_threads` wins for training)
    pairs: str = ""  # an existing pairs dataset (a generate_pairs.py output) instead of generating one
    seed: int = 0  # Optuna's sampler seed
    max_failures: int = 1  # restarts of a failed trial (it resumes from its last segment)
    keep_train_runs: bool = False  # keep every trial's Ray Train checkpoints after the sweep

    def __post_init__(self):
        sections(self, rounds=RoundsConfig)
        absolute_paths(self, "pairs")
        for name, ok, expected in [
            ("num_samples", self.num_samples >= 0, ">= 0"), ("segments", self.segments >= 1, ">= 1"),
            ("steps_per_segment", self.steps_per_segment >= 0, ">= 0"),
            ("grace_period", 1 <= self.grace_period <= self.segments, "in [1, segments]"),
            ("reduction_factor", self.reduction_factor > 1, "> 1"), ("max_concurrent", self.max_concurrent >= 0, ">= 0"),
            ("trial_cpus", self.trial_cpus >= 0, ">= 0"), ("threads", self.threads >= 0, ">= 0"),
            ("max_failures", self.max_failures >= 0, ">= 0"),
        ]:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")
        where = "grid" if self.search == "grid" else "space"
        params = getattr(self, where)
        if not params:
            raise ValueError(f"{where}: sweeps nothing; name at least one of {sorted(PARAMS)}")
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise ValueError(f"{where}: unknown hyperparameter(s) {unknown}; known: {sorted(PARAMS)}")
        try:
            max_steps = self.trial_rounds().train.max_steps  # validates rounds + trial
        except ConfigError as err:
            raise ValueError(f"trial: {err}") from err
        if self.steps_per_segment == 0 and max_steps < self.segments:
            raise ValueError(f"segments={self.segments}: more than train.max_steps={max_steps}")
        for name, values in params.items():
            if where == "grid":
                if not isinstance(values, list) or not values:
                    raise ValueError(f"grid.{name}={values!r}: expected a non-empty list of values")
            elif not (isinstance(values, list) and len(values) == 2 and float(values[0]) < float(values[1])):
                raise ValueError(f"space.{name}={values!r}: expected [low, high] with low < high")
            elif name in LOG_SCALE and float(values[0]) <= 0:
                raise ValueError(f"space.{name}={values!r}: searched on a log scale, expected low > 0")
            for v in values:
                if v is None and not (where == "grid" and name == "mu"):
                    raise ValueError(f"{where}.{name}: null is only meaningful for grid.mu (the safeguard off)")
                try:  # the tree's own checks (e.g. mu in [0, 1), epsilon in (0, 1))
                    self.trial_rounds({name: v})
                except ConfigError as err:
                    raise ValueError(f"{where}.{name}={v!r}: {err}") from err

    # -- the configs a trial runs ------------------------------------------------------------------
    def merged_rounds(self) -> dict:
        return merge(to_dict(self.rounds), self.trial)

    def trial_rounds(self, values: dict | None = None) -> RoundsConfig:
        """The RoundsConfig a trial trains round 0 of and evaluates with (``rounds`` ← ``trial`` ← values)."""
        return build(RoundsConfig, with_values(self.merged_rounds(), values or {}))

    @property
    def step_size(self) -> int:
        return self.steps_per_segment or max(1, self.trial_rounds().train.max_steps // self.segments)

    @property
    def swept(self) -> list[str]:
        return [p for p in PARAMS if p in (self.grid if self.search == "grid" else self.space)]  # in PARAMS order

    @property
    def trials(self) -> int:
        if self.search == "grid":
            return math.prod(len(v) for v in self.grid.values()) * max(self.num_samples, 1)
        return self.num_samples or 4


def with_values(rounds: dict, values: dict) -> dict:
    """A RoundsConfig dict with swept values at their paths (``mu`` → ``train.objective.safeguard.mu``; a
    ``mu`` of None turns the safeguard off)."""
    out = merge({}, rounds)
    for name, v in values.items():
        node = out
        *parents, leaf = PARAMS[name].split(".")
        if name == "mu" and v is None:
            out.setdefault("train", {}).setdefault("objective", {})["safeguard"] = None
            continue
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = float(v)
    return out


# -- one trial -----------------------------------------------------------------------------------
def sweep_trial(values: dict, *, sweep: dict, pairs: str, out: str, threads: int) -> None:
    """A Tune trial: train segment by segment with Ray Train, evaluate and report after each one."""
    import ray.tune
    import torch

    from .training.trainer import run_training

    torch.set_num_threads(threads)
    cfg = build(SweepConfig, sweep)
    rcfg = cfg.trial_rounds(values)
    out_dir = Path(out)
    trial_id = ray.tune.get_context().get_trial_id()
    ref = np.array(load_eval(out_dir / "reference_eval")["rewards"])
    start = 0
    checkpoint = ray.tune.get_checkpoint()  # a restarted trial: its Train run resumes on its own
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = json.loads((Path(d) / "segment.json").read_text())["segment"]
    steps = cfg.step_size
    base_train = rcfg.train_config(0, "", "")
    if not base_train.use_gpu and "torch_threads" not in cfg.trial.get("train", {}):
        # the tuned run's thread count is for its own machine; trials share it (CPUs / concurrent trials)
        base_train = replace(base_train, torch_threads=threads)
    for segment in range(start + 1, cfg.segments + 1):
        t0 = time.time()
        train = replace(base_train, max_steps=segment * steps, checkpoint_every=steps)
        # the trial's per-step metrics (TensorBoard + progress.jsonl) stay with its evaluations, outside the
        # Train runs that are removed at the end; no step lines from inside a Tune trial
        result = run_training(train, pairs, out_dir / "train", f"trial_{trial_id}",
                              logdir=out_dir / "trials" / trial_id / "tensorboard", progress=False)
        t1 = time.time()
        policy = out_dir / "train" / f"trial_{trial_id}.policy.safetensors"  # the weights the rounds would evaluate
        with result.checkpoint.as_directory() as d:
            policy_from_checkpoint(d, policy)
        ev = evaluate_policy(rcfg, str(policy), out_dir / "trials" / trial_id / f"segment_{segment}")
        metrics = {
            METRIC: ev["reward"]["mean"], "reward_ci_low": ev["reward"]["ci_low"], "reward_ci_high": ev["reward"]["ci_high"],
            **({"overall": ev["overall"]["mean"]} if ev.get("overall") else {}),
            "win_rate": win_rate(np.array(ev["rewards"]), ref), "segment": segment,
            "step": int(result.metrics.get("step", segment * steps)), "train_s": t1 - t0, "eval_s": time.time() - t1,
            **{f"train_{k}": float(result.metrics[k]) for k in ("loss", "implicit_acc", "lambda_mean")
               if isinstance(result.metrics.get(k), (int, float))},
        }
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "segment.json").write_text(json.dumps({"segment": segment, "metrics": metrics}))
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))


# -- the sweep -----------------------------------------------------------------------------------
def _param_space(cfg: SweepConfig) -> dict:
    from ray import tune

    if cfg.search == "grid":
        return {p: tune.grid_search([None if v is None else float(v) for v in cfg.grid[p]]) for p in cfg.swept}
    return {p: (tune.loguniform if p in LOG_SCALE else tune.uniform)(float(cfg.space[p][0]), float(cfg.space[p][1]))
            for p in cfg.swept}


def _concurrency(cfg: SweepConfig) -> int:
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    train = cfg.trial_rounds().train
    res = ray.cluster_resources()
    if train.use_gpu:
        fit = int(res.get("GPU", 0) // train.num_workers)
    else:
        fit = int(res.get("CPU", 1) // (cfg.trial_cpus + train.num_workers))
    return max(1, min(fit, cfg.trials))


def _trial_dirname(trial) -> str:
    return trial.trial_id


def run_sweep(cfg: SweepConfig, out: str | Path, *, log=print) -> dict:
    """Generate the pairs, evaluate the reference, run the Tune sweep (or resume it), write the outputs.
    Returns ``{"rows": [...], "best": row, "best_config": dict}``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .data.generate import generate

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    guard_run_dir(out, cfg, job="sweep", resumable=RESUMABLE)
    rcfg = cfg.trial_rounds()

    if cfg.pairs:
        pairs = Path(cfg.pairs).resolve()
        pairs = pairs / "pairs" if (pairs / "pairs").is_dir() else pairs
    else:
        log("generating the shared pairs dataset (round 0: the reference's rollouts)")
        manifest = generate(rcfg.generation_config(0, ""), out / "pairs")
        log(f"{manifest['num_pairs']} pairs")
        pairs = out / "pairs" / "pairs"
    ref_dir = out / "reference_eval"
    if not is_complete(ref_dir):
        log("evaluating the reference on held-out prompts")
        with atomic_directory(ref_dir, marker=True) as tmp:
            evaluate_policy(rcfg, "", tmp)
    concurrency = _concurrency(cfg)
    threads = cfg.threads or max(1, int(ray.cluster_resources().get("CPU", 1) // concurrency))
    log(f"{cfg.search} sweep over {', '.join(cfg.swept)}: {cfg.trials} trials, {concurrency} at a time, up to "
        f"{cfg.segments} segments × {cfg.step_size} steps each")

    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, sweep=to_dict(cfg), pairs=str(pairs), out=str(out), threads=threads),
        {"cpu": cfg.trial_cpus, "memory": TRIAL_MEMORY},
    )
    experiment = out / "tune"
    if tune.Tuner.can_restore(experiment):
        log(f"resuming the sweep in {experiment}")
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        searcher = None
        if cfg.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(metric=METRIC, mode="max", seed=cfg.seed)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", search_alg=searcher, num_samples=max(cfg.num_samples, 1) if cfg.search == "grid" else cfg.trials,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.segments,
                                        grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor),
                max_concurrent_trials=concurrency, trial_dirname_creator=_trial_dirname,
                reuse_actors=True,  # a trial driver process imports torch and the pipeline once, not per trial
            ),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(out), verbose=0,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    grid = tuner.fit()
    rows = [_row(cfg, r) for r in grid]
    rows.sort(key=lambda r: (r["final_reward"] if r["final_reward"] is not None else -math.inf), reverse=True)
    best = _best(cfg, rows)
    best_config = with_values(to_dict(cfg.rounds), {p: best[p] for p in cfg.swept}) if best else None
    _write_outputs(cfg, out, rows, best, best_config, load_eval(ref_dir))
    if not cfg.keep_train_runs:
        shutil.rmtree(out / "train", ignore_errors=True)
    return {"rows": rows, "best": best, "best_config": best_config}


def _row(cfg: SweepConfig, result) -> dict:
    df = result.metrics_dataframe
    history = [] if df is None or METRIC not in df else df.dropna(subset=[METRIC]).to_dict("records")
    history = sorted({int(h["segment"]): h for h in history}.values(), key=lambda h: h["segment"])  # one per segment
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    config = result.config or {}
    row = {"trial": trial_id, **{p: (None if config[p] is None else float(config[p])) if p in config else math.nan
                                 for p in cfg.swept}}
    final = history[-1] if history else None
    best = max(history, key=lambda h: h[METRIC]) if history else None
    row.update(
        segments_run=len(history), steps=int(final["step"]) if final else 0,
        stopped_early=bool(result.error is None and 0 < len(history) < cfg.segments),
        final_reward=final[METRIC] if final else None,
        final_ci_low=final["reward_ci_low"] if final else None, final_ci_high=final["reward_ci_high"] if final else None,
        best_reward=best[METRIC] if best else None,
        best_ci_low=best["reward_ci_low"] if best else None, best_ci_high=best["reward_ci_high"] if best else None,
        best_segment=int(best["segment"]) if best else None,
        win_rate=final["win_rate"] if final else None,
        error=(str(result.error).strip().splitlines() or [""])[-1][:200] if result.error else "",
    )
    return row


def _best(cfg: SweepConfig, rows: list[dict]) -> dict | None:
    """The highest final reward among trials that ran every segment (the budget best_config.yaml trains
    with); if none did, among all trials that reported."""
    full = [r for r in rows if r["segments_run"] == cfg.segments and not r["error"]]
    pool = full or [r for r in rows if r["final_reward"] is not None]
    return max(pool, key=lambda r: r["final_reward"]) if pool else None


def _v(v) -> str:
    """A swept value: ``off`` for μ = None (the safeguard off)."""
    return "off" if v is None else f"{v:.4g}"


def _status(cfg: SweepConfig, r: dict) -> str:
    return "error" if r["error"] else "stopped early" if r["stopped_early"] else "completed" \
        if r["segments_run"] == cfg.segments else "incomplete"


def _write_outputs(cfg: SweepConfig, out: Path, rows: list[dict], best: dict | None, best_config: dict | None,
                   ref: dict) -> None:
    swept = cfg.swept
    columns = ["trial", *swept, "status", "segments_run", "steps", "final_reward", "final_ci_low", "final_ci_high",
               "best_reward", "best_ci_low", "best_ci_high", "best_segment", "win_rate", "stopped_early", "error"]
    atomic_write_bytes(out / "results.csv", csv_table([{**r, "status": _status(cfg, r)} for r in rows], columns).encode())

    def ci(r: dict, which: str) -> str:  # "final" / "best" interval of a trial row
        return fmt_ci({"mean": r[f"{which}_reward"], "ci_low": r[f"{which}_ci_low"], "ci_high": r[f"{which}_ci_high"]})

    rw = ref["reward"]
    train = cfg.trial_rounds().train_config(0, "", "")
    objective = train.objective_config()
    fixed = {"mu": objective.safeguard.mu if objective.safeguard else None, "beta": objective.beta,
             "epsilon": objective.epsilon}
    lines = [
        f"# Sweep: {cfg.search} over {', '.join(swept)} ({len(rows)} trials)",
        "",
        f"Objective `{train.objective.name}` (SDPO safeguard: {objective.safeguard.space + ' space, μ ' + format(objective.safeguard.mu, 'g') if objective.safeguard else 'off'}), "
        f"lr {train.lr:g}, batch {train.batch_size}; up to {cfg.segments} segments × "
        f"{cfg.step_size} steps; ASHA on the held-out reward (grace {cfg.grace_period} segment(s), reduction factor "
        f"{cfg.reduction_factor:g}). Fixed: " + (", ".join(f"{p}={_v(fixed[p])}" for p in PARAMS if p not in swept) or "–") + ".",
        f"Held-out eval: {ref['num_prompts']} prompts × {ref['samples_per_prompt']} samples; "
        f"reference reward {fmt_ci(rw)} (95% CI over prompts).",
        "",
        ("**Best**: " + ", ".join(f"{p}={_v(best[p])}" for p in swept) + f" (trial {best['trial']}): final reward "
         f"{ci(best, 'final')} → `best_config.yaml`") if best else "**No trial reported a reward.**",
        "",
        markdown_table(
            ["trial", *swept, "final reward [95% CI]", "best reward [95% CI] (segment)", "win vs ref", "segments",
             "status"],
            [[r["trial"], *(_v(r[p]) for p in swept), ci(r, "final"),
              f"{ci(r, 'best')} ({'–' if r['best_segment'] is None else r['best_segment']})", fmt_num(r["win_rate"]),
              r["segments_run"], f"{_status(cfg, r)}{': ' + r['error'] if r['error'] else ''}"] for r in rows]),
    ]
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())

    done = [r for r in rows if r["final_reward"] is not None]
    panels = {p: {"x": [r[p] for r in done], "y": [r["final_reward"] for r in done],
                  "lo": [r["final_ci_low"] for r in done], "hi": [r["final_ci_high"] for r in done],
                  "hollow": [r["stopped_early"] for r in done], "label": "trial (final segment)",
                  "hollow_label": "stopped early by ASHA"} for p in swept}
    plot_scatter_panels(panels, out / "reward_vs_hparams.png", ylabel="held-out reward (95% CI)",
                        title=f"{cfg.search} sweep: final reward per trial", band=(rw["mean"], rw["ci_low"], rw["ci_high"]),
                        band_label="reference", log_x=[p for p in swept if p in LOG_SCALE])
    if best_config is not None:
        import yaml

        header = (f"# The best trial of the sweep in {out.name}/ (trial {best['trial']}: "
                  + ", ".join(f"{p}={_v(best[p])}" for p in swept) + f"; final reward {ci(best, 'final')}).\n"
                  f"# Run it: python jobs/iterative_sipo.py --config {out / 'best_config.yaml'}\n")
        atomic_write_bytes(out / "best_config.yaml", (header + yaml.safe_dump(best_config, sort_keys=False)).encode())
