"""Ray Train V2 + FSDP2 on CPU (gloo): training on generated pairs, two sharded workers, resuming."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.training.loop import EMA_FILE, WEIGHTS_FILE
from pipeline.training.trainer import run_training

pytestmark = pytest.mark.slow


def test_one_worker_trains_and_checkpoints(tiny_pairs, tiny_train_config, tiny_toy_model_dir, tmp_path):
    result = run_training(tiny_train_config(), tiny_pairs, tmp_path, "one")
    m = result.metrics
    for key in ("loss", "residual_w", "margin", "implicit_acc", "lambda_mean", "grad_norm", "pairs_per_s", "step"):
        assert key in m, key
    assert m["step"] == 2
    with result.checkpoint.as_directory() as d:
        trained = load_file(f"{d}/{WEIGHTS_FILE}")
        assert load_file(f"{d}/{EMA_FILE}")
    initial = load_file(str(tiny_toy_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def test_two_workers_shard_with_fsdp2_and_resume(tiny_pairs, tiny_train_config, tiny_toy_model_dir, tmp_path):
    # the exact (parameter-space) SDPO λ takes gradients of sharded (DTensor) parameters
    sharded = dict(num_workers=2, objective="sipo", sdpo_mu=0.0, sdpo_space="parameter")
    first = run_training(tiny_train_config(**sharded), tiny_pairs, tmp_path, "two")
    assert first.metrics["step"] == 2
    assert 0.0 <= first.metrics["lambda_mean"] <= 1.0
    with first.checkpoint.as_directory() as d:
        full = load_file(f"{d}/{WEIGHTS_FILE}")
    initial = load_file(str(tiny_toy_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in initial.items()}  # gathered, not shards
    again = run_training(tiny_train_config(**sharded, max_steps=4), tiny_pairs, tmp_path, "two")
    assert again.metrics["step"] == 4
    with again.checkpoint.as_directory() as d:
        assert json.loads(open(f"{d}/metrics.json").read())["step"] == 4


def test_too_few_pairs_is_a_clear_error(tiny_pairs, tiny_train_config, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch per worker"):
        run_training(tiny_train_config(batch_size=64), tiny_pairs, tmp_path, "big")
