"""jobs/train.py end to end on a tiny model: its console, outputs, the exported folder, resume on rerun, LoRA, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.backbones import load_backbone

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
import train  # noqa: E402
from console_checks import ray_lines  # noqa: E402


@pytest.fixture(scope="module")
def pairs_dir(tiny_pairs):
    """A generate_pairs.py output folder (manifest + pairs/) for the tiny model: the session's tiny dataset, on the
    module's private local Ray."""
    return Path(tiny_pairs).parent


def settings(model_dir, **kw):
    base = {"model": str(model_dir), "objective.name": "sipo", "lr": 1e-3, "max_steps": 2, "batch_size": 2,
            "checkpoint_every": 1}
    return [f"{k}={v}" for k, v in {**base, **kw}.items()]


def predict(backbone):
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        return backbone.predict(x, t, backbone.encode_prompts(["a red circle", "two blue squares"]))


@pytest.mark.slow
def test_train_job_prints_its_steps_writes_everything_exports_and_resumes(pairs_dir, tiny_toy_model_dir, tmp_path):
    """The job as a user runs it (its own local Ray): its console holds its own step lines and none of Ray's; then
    the outputs, the export, a resume in this process and a refused config."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--pairs", str(pairs_dir), "--out", str(out),
                          "--num-cpus", "2", "--set", *settings(tiny_toy_model_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    console = (run.stdout + run.stderr).rstrip("\n").split("\n")  # not splitlines(): a redrawn bar's \r stays
    assert run.returncode == 0, console[-60:]
    assert not ray_lines(console), console
    steps = [line for line in console if "train · step " in line]
    assert [line.split("train · ")[1].split(" · ")[0] for line in steps] == ["step 1/2", "step 2/2"], console
    assert all(" · loss " in line and " pairs/s" in line for line in steps), console
    assert any("train · done · step 2/2 in " in line for line in console), console
    assert len(console) <= 12, console
    for f in ("policy.safetensors", "metrics.json", "metrics.csv", "curves.png", "train.json", "model/unet/config.json"):
        assert (out / f).exists(), f
    history = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and all("loss" in h and "pairs_per_s" in h for h in history)
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,")
    assert json.loads((out / "train.json").read_text())["last"]["step"] == 2

    policy = load_file(str(out / "policy.safetensors"))
    initial = load_file(str(tiny_toy_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(policy) == set(initial) and any(not torch.equal(policy[k], initial[k]) for k in policy)
    exported = load_backbone(out / "model")  # the exported folder is the policy, loadable like any model
    assert all(torch.equal(v, policy[k]) for k, v in exported.denoiser.state_dict().items())
    assert torch.allclose(predict(exported), predict(load_backbone(tiny_toy_model_dir, weights=out / "policy.safetensors")))

    # Rerun with more steps: resumes at step 2 (the first two reports come from the checkpoint, unchanged).
    assert train.main(["--pairs", str(pairs_dir), "--out", str(out), "--set", *settings(tiny_toy_model_dir, max_steps=3)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in resumed] == [1, 2, 3] and resumed[:2] == history

    # Same storage, another config: refused before Ray starts.
    with pytest.raises(SystemExit, match="lr: 0.001 -> 0.01"):
        train.main(["--pairs", str(pairs_dir), "--out", str(out), "--set", *settings(tiny_toy_model_dir, lr=0.01)])


@pytest.mark.slow
def test_train_job_lora_exports_merged_model_and_adapter(pairs_dir, tiny_toy_model_dir, tmp_path):
    out = tmp_path / "lora"
    argv = ["--pairs", str(pairs_dir / "pairs"), "--out", str(out), "--name", "lora",
            "--set", *settings(tiny_toy_model_dir, lora_rank=2, lr=1e-2, max_steps=1)]
    assert train.main(argv) == 0
    assert (out / "model" / "unet_lora" / "pytorch_lora_weights.safetensors").exists()
    policy = load_backbone(tiny_toy_model_dir, lora_rank=2, weights=out / "policy.safetensors")
    exported = load_backbone(out / "model")  # merged: loads as a plain model, no peft keys
    assert torch.allclose(predict(exported), predict(policy), atol=1e-5)
    base = load_backbone(tiny_toy_model_dir)
    assert not torch.allclose(predict(base), predict(policy), atol=1e-5)  # training moved the adapter
    base.denoiser.load_lora_adapter(str(out / "model" / "unet_lora"), prefix=None, use_safetensors=True)
    assert torch.allclose(predict(base), predict(policy), atol=1e-5)


def test_bad_input_is_a_clear_error(tmp_path, tiny_toy_model_dir):
    with pytest.raises(SystemExit, match="no such file or folder.*generate_pairs.py"):
        train.main(["--pairs", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .parquet files"):
        train.main(["--pairs", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"unknown config field 'lrr'; did you mean 'lr'"):
        train.main(["--pairs", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--set", "lrr=1"])
    with pytest.raises(SystemExit, match=r"lr=-1\.0: expected > 0"):
        train.main(["--pairs", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--set", "lr=-1"])


def test_help_shows_the_examples():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--pairs" in out.stdout and "generate_pairs.py" in out.stdout
