"""Ray Train V2 + FSDP2 on CPU (gloo): training on generated pairs, two sharded workers, resuming."""

import json

import pytest
import ray
import torch
from safetensors.torch import load_file

from pipeline.data.generate import GenerationConfig, generate
from pipeline.training.loop import EMA_FILE, WEIGHTS_FILE, TrainConfig
from pipeline.training.trainer import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs(tiny_toy_model_dir, tmp_path_factory):
    ray.init(num_cpus=2, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    out = tmp_path_factory.mktemp("pairs") / "ddspo"
    generate(GenerationConfig(model=str(tiny_toy_model_dir), strategy="ddspo-paired", prompt_limit=8, batch_size=8,
                              sampler={"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 8}), out)
    yield out / "pairs"
    ray.shutdown()


def config(model_dir, **kw):
    base = dict(model=str(model_dir), objective="ddspo", sdpo_mu=0.5, lr=1e-3, max_steps=2, batch_size=2,
                checkpoint_every=2, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def test_one_worker_trains_and_checkpoints(pairs, tiny_toy_model_dir, tmp_path):
    result = run_training(config(tiny_toy_model_dir), pairs, tmp_path, "one")
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


def test_two_workers_shard_with_fsdp2_and_resume(pairs, tiny_toy_model_dir, tmp_path):
    first = run_training(config(tiny_toy_model_dir, num_workers=2, objective="sipo"), pairs, tmp_path, "two")
    assert first.metrics["step"] == 2
    with first.checkpoint.as_directory() as d:
        full = load_file(f"{d}/{WEIGHTS_FILE}")
    initial = load_file(str(tiny_toy_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in initial.items()}  # gathered, not shards
    again = run_training(config(tiny_toy_model_dir, num_workers=2, objective="sipo", max_steps=4), pairs, tmp_path, "two")
    assert again.metrics["step"] == 4
    with again.checkpoint.as_directory() as d:
        assert json.loads(open(f"{d}/metrics.json").read())["step"] == 4


def test_too_few_pairs_is_a_clear_error(pairs, tiny_toy_model_dir, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch per worker"):
        run_training(config(tiny_toy_model_dir, batch_size=64), pairs, tmp_path, "big")
