"""Ray Train V2 + FSDP2 on CPU (gloo): training on generated pairs, two sharded workers, resuming."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.training.worker import EMA_FILE, WEIGHTS_FILE
from pipeline.training.trainer import run_training

pytestmark = pytest.mark.slow


def read_events(path):
    """(step, tag, value) of every scalar in a TensorBoard event file (TFRecord framing around Event protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out, data = [], open(path, "rb").read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_one_worker_trains_and_checkpoints(tiny_pairs, tiny_train_config, tiny_toy_model_dir, tmp_path):
    result = run_training(tiny_train_config(max_steps=3, log_every=1, checkpoint_every=2), tiny_pairs, tmp_path, "one",
                          logdir=tmp_path / "tb")
    # a metrics report every log_every step, independent of the checkpoints (steps 2 and 3)
    progress = [json.loads(line) for line in (tmp_path / "tb" / "progress.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress] == [1, 2, 3]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    assert sorted(step for step, tag, _ in read_events(events[0]) if tag == "train/loss") == [1, 2, 3]
    m = result.metrics
    for key in ("loss", "residual_w", "margin", "implicit_acc", "lambda_mean", "grad_norm", "pairs_per_s", "step"):
        assert key in m, key
    assert m["step"] == 3
    with result.checkpoint.as_directory() as d:
        trained = load_file(f"{d}/{WEIGHTS_FILE}")
        assert load_file(f"{d}/{EMA_FILE}")
    initial = load_file(str(tiny_toy_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def test_two_workers_shard_with_fsdp2_and_resume(tiny_pairs, tiny_train_config, tiny_toy_model_dir, tmp_path):
    # the exact (parameter-space) SDPO λ takes gradients of sharded (DTensor) parameters
    sharded = dict(num_workers=2, objective={"name": "sipo", "safeguard": {"mu": 0.0, "space": "parameter"}})
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
