"""The online round loop on a tiny model: LoRA rounds, reference schedules, selection, config errors (the plain
one-round run, its outputs and skip-on-rerun: tests/test_cluster_submit.py)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.backbones import load_backbone
from pipeline.rounds import RoundsConfig, run_rounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import iterative_sipo  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_relative_model_path_is_made_absolute(tiny_toy_model_dir, monkeypatch):
    """Ray's workers and actors run in another directory, so a model path relative to the driver's working directory
    is held absolute from the start, in every section. (The one-round run itself, its outputs and its rerun are
    checked on the main job submitted to a cluster: tests/test_cluster_submit.py.)"""
    monkeypatch.chdir(tiny_toy_model_dir.parent)
    cfg = RoundsConfig(model=tiny_toy_model_dir.name, rounds=1)
    assert cfg.model == cfg.train.model == cfg.generation.model == str(tiny_toy_model_dir.absolute())


def _build(*argv):
    from pipeline.cli import resolve

    return resolve(iterative_sipo.parse_args(list(argv)), RoundsConfig)


def test_job_config_errors_name_the_field(capsys, tmp_path):
    for override, message in [
        ("roundz=2", r"unknown config field 'roundz'; did you mean 'rounds'"),
        ("train.lrr=1", r"unknown config field 'train\.lrr'; did you mean 'train\.lr'"),
        ("train.lr=-1", r"train\.lr=-1.0: expected > 0"),
        ("train.max_steps=10.5", r"train\.max_steps=10\.5: expected an integer"),
        ("eval.num_prompts=-3", r"eval\.num_prompts=-3"),
        ("train.objective.safegaurd.mu=0.5", r"unknown config field 'train\.objective\.safegaurd'; did you mean"),
    ]:
        with pytest.raises(SystemExit, match=message):
            _build("--set", override)
    # repeated --set accumulate; a YAML-string float is coerced; the recipe stays under a partial --config
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-5\n")
    cfg = _build("--config", str(tmp_path / "c.yaml"), "--set", "rounds=5", "--set", "train.objective.name=dmpo",
                 "train.objective.safeguard.mu=0.9")
    assert cfg.rounds == 5 and cfg.train.lr == 1e-5 and cfg.train.objective.name == "dmpo"
    assert cfg.train.objective.safeguard.mu == 0.9 and cfg.train.objective.beta == 500.0  # the recipe's β
    assert cfg.generation.samples_per_prompt == 4 and cfg.train.max_steps == 150
    with pytest.raises(SystemExit) as done:
        _build("--print-config", "--set", "train.lr=3e-5")
    assert done.value.code == 0 and "lr: 3.0e-05" in capsys.readouterr().out


def test_two_lora_rounds_roll_out_and_train_from_the_adapter(local_ray, tiny_toy_model_dir, tmp_path, monkeypatch):
    """Round 1 samples from round 0's LoRA policy and trains on from it — with round 0's AdamW state, on its
    own and round 0's pairs, the checkpoint chosen on validation prompts; the export merges the adapter."""
    cfg = RoundsConfig(
        model=str(tiny_toy_model_dir), rounds=2, carry_optimizer=True, replay=1, lr_decay=0.5,
        select={"name": "validation", "num_prompts": 2, "samples": 1, "include_start": False},
        eval={"num_prompts": 2, "samples": 2, "sampler": {"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 16}},
        generation={"prompt_limit": 8, "samples_per_prompt": 2, "batch_size": 8,
                    "sampler": {"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 8}},
        train={"objective": {"name": "sipo"}, "lora_rank": 4, "lr": 1e-2, "max_steps": 2, "batch_size": 2, "checkpoint_every": 1},
    )
    logs: list[str] = []
    monkeypatch.chdir(tmp_path)  # a relative run directory, as the job's default: round 1's workers must find round 0
    rows = run_rounds(cfg, "run", log=logs.append)
    run = tmp_path / "run"
    manifest = json.loads((run / "round_1" / "pairs_manifest.json").read_text())
    assert manifest["config"]["weights"].endswith("round_0/policy.safetensors")
    assert manifest["config"]["lora_rank"] == 4
    # replay: round 1 trained on its pairs and round 0's (kept in round_0/pairs)
    assert (run / "round_0" / "pairs" / "manifest.json").exists()
    assert any(line.startswith("round 1: training on") and "+ 1 earlier round(s)' pairs" in line for line in logs)
    # carried optimizer: Adam's step count continues (2 steps per round) and round 1 ran at lr × 0.5
    import torch

    steps = [torch.load(run / f"round_{k}" / "optimizer.pt", weights_only=True)["state"] for k in (0, 1)]
    assert {float(v["step"]) for v in steps[0].values()} == {2.0} and {float(v["step"]) for v in steps[1].values()} == {4.0}
    m1 = json.loads((run / "round_1" / "train_metrics.json").read_text())
    assert m1["last"]["lr"] == pytest.approx(0.5e-2)
    # checkpoint selection on validation prompts: both checkpoints scored, the best one chosen
    val = m1["selection"]["validation"]
    assert [v["step"] for v in val] == [1, 2]
    assert m1["selection"]["selected_step"] == max(val, key=lambda v: v["reward"])["step"]
    # the round table: paired Δ against the previous round, the pairs' statistics and the drift statistics
    assert rows[2]["delta_vs_prev"] is not None and rows[2]["num_pairs"] == manifest["num_pairs"]
    assert rows[2]["rollout_reward"] == pytest.approx(manifest["mean_prompt_reward"])
    assert "Δ vs previous, paired" in (run / "summary.md").read_text()
    from safetensors.torch import load_file

    p0, p1 = (load_file(str(run / f"round_{k}" / "policy.safetensors")) for k in (0, 1))
    lora_keys = [k for k in p1 if "lora_" in k]
    assert lora_keys and any(not np.allclose(p0[k].numpy(), p1[k].numpy()) for k in lora_keys)
    assert (run / "final_model" / "unet_lora").is_dir()
    final = load_backbone(run / "final_model")  # adapter merged: a plain model folder
    assert not any("lora_" in n for n, _ in final.denoiser.named_parameters())


def test_refresh_with_lora_is_refused():
    with pytest.raises(ValueError, match="refresh"):
        RoundsConfig(reference="refresh", train={"lora_rank": 4})


def test_selection_never_looks_at_the_test_prompts():
    with pytest.raises(ValueError, match="never chosen on test prompts"):
        RoundsConfig(select={"name": "validation", "prompts": "toy:heldout"})
    from pipeline.data.prompts import load_prompts

    fit, val = ({r["prompt"] for r in load_prompts(s)} for s in ("toy:fit", "toy:val"))
    assert len(fit) == 144 and len(val) == 24 and not fit & val
    assert fit | val == {r["prompt"] for r in load_prompts("toy:train")}


def test_reference_schedules_pick_or_average_the_right_weights(tiny_toy_model_dir, tmp_path):
    """fixed: the model's own; refresh every 2: the policy of the last refresh point; ema: the exact average."""
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.rounds import POLICY_FILE, REFERENCE_FILE, reference_for_round

    base = {n: t.clone() for n, t in load_backbone(tiny_toy_model_dir).denoiser.state_dict().items()}
    run = tmp_path / "run"
    for k in range(3):  # fake published policies: base + k + 1
        (run / f"round_{k}").mkdir(parents=True)
        save_file({n: t + (k + 1) for n, t in base.items()}, str(run / f"round_{k}" / POLICY_FILE))
    work = tmp_path / "work"
    work.mkdir()
    fixed = RoundsConfig(model=str(tiny_toy_model_dir))
    assert reference_for_round(fixed, 2, run, work) == ""
    every2 = RoundsConfig(model=str(tiny_toy_model_dir), reference={"name": "refresh", "every": 2})
    assert [reference_for_round(every2, k, run, work) for k in (0, 1, 2, 3)] == [
        "", "", str(run / "round_1" / POLICY_FILE), str(run / "round_1" / POLICY_FILE)]
    ema = RoundsConfig(model=str(tiny_toy_model_dir), reference={"name": "ema", "decay": 0.75})
    ref1 = load_file(reference_for_round(ema, 1, run, work))  # 0.75 · base + 0.25 · (base + 1)
    name = next(iter(base))
    torch.testing.assert_close(ref1[name], base[name] + 0.25)
    (work / REFERENCE_FILE).rename(run / "round_1" / REFERENCE_FILE)  # published with round 1
    ref2 = load_file(reference_for_round(ema, 2, run, work))  # 0.75 · ref1 + 0.25 · (base + 2)
    torch.testing.assert_close(ref2[name], base[name] + 0.75 * 0.25 + 0.5, rtol=0, atol=1e-5)
