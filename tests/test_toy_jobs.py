"""The toy world's jobs: deterministic pretraining, atomic outputs, and the evaluation job."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

import evaluate_toy  # noqa: E402
import pretrain_toy  # noqa: E402


def run_pretrain(out: Path, seed: int) -> dict:
    args = pretrain_toy.parse_args(["--steps", "2", "--batch-size", "8", "--out", str(out), "--seed", str(seed)])
    pretrain_toy.pretrain(args)
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def test_pretraining_is_deterministic_and_atomic(tmp_path):
    a = run_pretrain(tmp_path / "a", seed=0)
    b = run_pretrain(tmp_path / "b", seed=0)
    c = run_pretrain(tmp_path / "c", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    summary = json.loads((tmp_path / "a" / "pretraining.json").read_text())
    assert summary["args"]["corrupt_prob"] == 0.2 and len(summary["history"]["loss"]) >= 1
    assert (tmp_path / "a" / "pretraining_loss.png").exists()


def test_pretrain_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        pretrain_toy.parse_args(["--corrupt-prob", "1.5"])
    assert "--corrupt-prob" in capsys.readouterr().err


def test_evaluate_job_writes_its_report(tiny_toy_model_dir, tmp_path):
    out = tmp_path / "eval"
    assert evaluate_toy.main(["--model", str(tiny_toy_model_dir), "--out", str(out), "--max-prompts", "2",
                              "--samples-per-prompt", "2", "--steps", "2"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["num_prompts"] == 2 and len(report["rewards"]) == 2
    assert (out / "grid.png").exists() and "best-of-2" in (out / "eval.md").read_text()


@pytest.mark.parametrize("job", ["pretrain_toy.py", "evaluate_toy.py", "iterative_sipo.py", "sweep.py", "train.py",
                                 "generate_pairs.py", "human_study.py"])
def test_jobs_have_help_and_print_config(job):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout and "--print-config" in out.stdout


def test_a_rounds_recipe_configures_the_generation_and_training_jobs():
    """``--recipe toy-rounds`` on jobs/generate_pairs.py and jobs/train.py starts from the default's generation and
    training sections; a recipe of another tree (the sweep's) is not offered to them, nor a rounds one to the sweep."""
    import generate_pairs
    import sweep
    import train
    import yaml

    from pipeline.cli import config_data
    from pipeline.recipes import TOY_ROUNDS

    generation = config_data(generate_pairs.parse_args(["--out", "x", "--recipe", "toy-rounds"]))
    assert generation == TOY_ROUNDS["generation"]
    training = config_data(train.parse_args(["--pairs", "p", "--out", "x", "--recipe", "toy-rounds",
                                             "--set", "max_steps=7"]))
    assert training == {**TOY_ROUNDS["train"], "max_steps": 7}
    shown = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate_pairs.py"), "--out", "x", "--recipe",
                            "toy-rounds", "--print-config"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["pairing"] == "all", shown.stderr
    for job, argv in ((generate_pairs, ["--out", "x", "--recipe", "toy-sweep"]),
                      (sweep, ["--out", "x", "--recipe", "toy-rounds"])):
        with pytest.raises(SystemExit):
            job.parse_args(argv)
