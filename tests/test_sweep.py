"""jobs/sweep.py end to end on the toy architecture: a grid sweep where ASHA must stop a trial, an Optuna
sweep with two trials at a time, the outputs, best_config.yaml through iterative_sipo's build, a resume."""

import csv
import json
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import iterative_sipo  # noqa: E402
import sweep  # noqa: E402

from pipeline.toyworld.reference import REFERENCE_DIR  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]  # local_ray: the session's Ray (conftest.py)

SAMPLER = {"num_steps": 2, "guidance_scale": 3.0, "eta": 1.0, "batch_size": 16}


def _rounds(model, **train) -> dict:
    return {"model": str(model), "rounds": 1, "eval": {"num_prompts": 4, "samples": 2, "sampler": {**SAMPLER, "num_steps": 4}},
            "generation": {"strategy": "ddspo-paired", "prompt_limit": 8, "batch_size": 8, "sampler": {**SAMPLER, "batch_size": 8}},
            "train": {"objective": {"name": "sipo", "safeguard": {"mu": 0.9}}, "max_steps": 2, "batch_size": 2, **train}}


def _run(tmp_path: Path, name: str, cfg: dict, *extra: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / name
    assert sweep.main(["--out", str(out), "--recipe", "defaults", "--config", str(path), *extra]) == 0
    return out


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def _check_best_config(out: Path, rows: list[dict], swept: list[str]) -> dict:
    best = max((r for r in rows if r["status"] == "completed"), key=lambda r: float(r["final_reward"]))
    from pipeline.cli import resolve
    from pipeline.rounds import RoundsConfig

    cfg = resolve(iterative_sipo.parse_args(["--config", str(out / "best_config.yaml")]), RoundsConfig)
    objective = cfg.train.objective  # validated like the job does
    where = {"mu": objective.safeguard.mu if objective.safeguard else None, "beta": objective.beta,
             "epsilon": objective.epsilon}
    for p in swept:
        assert where[p] == pytest.approx(float(best[p])), p
    assert best["trial"] in (out / "best_config.yaml").read_text()  # the header names the trial
    return best


def _resources_released(timeout_s: float = 30.0) -> bool:
    """No trial driver or Train worker (or their placement groups) is left holding a CPU."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return True
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def grid_sweep(local_ray, tmp_path_factory):
    """A grid sweep built so ASHA must stop its second trial; returns (folder, config).

    Trials run one at a time in grid order (β = 1e-12 first). With β = 1e-12 the gradient is ~1e-12, so Adam
    moves the weights by ~lr·1e-4 and the first trial keeps the trained reference's reward; with β = 1e4 and
    lr = 1e-2 one step moves every weight by ~0.01 and wrecks the small UNet. At rung 1 (grace period 1)
    ASHA's cutoff is the first trial's reward, which the second one is below, so it stops after 1 of 2
    segments."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = {"rounds": _rounds(REFERENCE_DIR, lr=1e-2), "grid": {"mu": [0.9], "beta": [1e-12, 1e4]},
           "segments": 2, "grace_period": 1, "reduction_factor": 2, "max_concurrent": 1}
    return _run(tmp, "grid", cfg), cfg


def test_grid_sweep_asha_stops_a_trial_and_writes_everything(grid_sweep):
    out, cfg = grid_sweep
    rows = _rows(out)
    assert [float(r["beta"]) for r in sorted(rows, key=lambda r: r["trial"])] == [1e-12, 1e4]
    by_beta = {float(r["beta"]): r for r in rows}
    assert by_beta[1e-12]["status"] == "completed" and by_beta[1e-12]["segments_run"] == "2"
    assert by_beta[1e4]["status"] == "stopped early" and by_beta[1e4]["segments_run"] == "1"
    assert by_beta[1e4]["stopped_early"] == "True"
    assert float(by_beta[1e4]["final_reward"]) < float(by_beta[1e-12]["final_reward"])
    for r in rows:
        assert float(r["final_ci_low"]) <= float(r["final_reward"]) <= float(r["final_ci_high"])
        assert not r["error"]
    best = _check_best_config(out, rows, ["mu", "beta"])
    assert float(best["beta"]) == 1e-12
    # best_config.yaml is the tuned `rounds` config with only the swept values changed
    saved = yaml.safe_load((out / "best_config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-2 and saved["eval"]["num_prompts"] == 4
    md = (out / "results.md").read_text()
    assert "stopped early" in md and "reference reward" in md and best["trial"] in md
    assert (out / "reward_vs_hparams.png").stat().st_size > 0
    assert (out / "pairs" / "manifest.json").exists()  # generated once, up front
    assert sorted(p.name for p in (out / "trials" / best["trial"]).iterdir()) == ["segment_1", "segment_2", "tensorboard"]
    progress = (out / "trials" / best["trial"] / "tensorboard" / "progress.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in progress] == [1, 2]  # the trial's per-step metrics
    assert not (out / "train").exists()  # Train checkpoints removed (keep_train_runs=false)
    assert _resources_released()
    # A rerun resumes the finished experiment: nothing is trained or evaluated again (every trial file is
    # untouched), the tables are rewritten.
    def trial_files() -> dict:
        return {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("*") if p.is_file()}

    before = trial_files()
    _run(out.parent, "grid", cfg)
    assert trial_files() == before
    assert [(r["trial"], r["final_reward"]) for r in _rows(out)] == [(r["trial"], r["final_reward"]) for r in rows]


def test_optuna_sweep_two_trials_at_a_time(tiny_toy_model_dir, grid_sweep, tmp_path):
    space = {"mu": [0.1, 0.9], "beta": [100.0, 5000.0], "epsilon": [0.05, 0.3]}
    cfg = {"rounds": _rounds(tiny_toy_model_dir, lr=1e-3), "space": space, "segments": 1, "max_concurrent": 2,
           "pairs": str(grid_sweep[0] / "pairs")}  # an existing dataset (the grid sweep's) instead of generating
    out = _run(tmp_path, "optuna", cfg, "--search", "optuna", "--num-samples", "2")
    rows = _rows(out)
    assert len(rows) == 2
    for r in rows:
        for p, (lo, hi) in space.items():
            assert lo <= float(r[p]) <= hi
        assert r["status"] in ("completed", "stopped early") and not r["error"]
    assert rows[0]["beta"] != rows[1]["beta"]
    _check_best_config(out, rows, ["mu", "beta", "epsilon"])
    assert (out / "reward_vs_hparams.png").stat().st_size > 0
    assert not (out / "pairs").exists()  # the given pairs were used
    assert _resources_released()


def test_config_errors_name_the_field():
    from pipeline.recipes import TOY_ONE_ROUND

    with pytest.raises(SystemExit, match="unknown config field 'segmentz'; did you mean 'segments'"):
        sweep.build(sweep.parse_args(["--set", "segmentz=2"]))
    with pytest.raises(SystemExit, match=r"grid\.mu=2.*train\.objective\.safeguard\.mu=2"):
        sweep.build(sweep.parse_args(["--set", "grid.mu=[2]"]))
    with pytest.raises(SystemExit, match="unknown hyperparameter"):
        sweep.build(sweep.parse_args(["--set", "grid.lr=[1e-4]"]))
    with pytest.raises(SystemExit, match=r"space\.beta"):
        sweep.build(sweep.parse_args(["--search", "optuna", "--set", "space.beta=[0,10]"]))
    cfg = sweep.build(sweep.parse_args(["--search", "optuna", "--num-samples", "5", "--set", "rounds.train.lr=1e-4"]))
    assert cfg.search == "optuna" and cfg.trials == 5 and cfg.rounds.train.lr == 1e-4
    # the tuned run: the toy-one-round recipe, shortened to fit the sweep's budget
    assert cfg.rounds.generation.prompt_limit == 96 and cfg.rounds.train.max_steps == 100
    assert cfg.rounds.generation.samples_per_prompt == TOY_ONE_ROUND["generation"]["samples_per_prompt"]
    assert cfg.rounds.train.objective.beta == TOY_ONE_ROUND["train"]["objective"]["beta"]
    assert cfg.trial_rounds().eval.num_prompts == 16 and cfg.rounds.eval.num_prompts == 48
    default = sweep.build(sweep.parse_args([]))
    assert default.trials == 4 and default.step_size * default.segments == 100
