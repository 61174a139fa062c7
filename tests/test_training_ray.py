"""Ray Train V2 + FSDP2 on CPU (gloo): training on generated pairs, two sharded workers, resuming."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.training.checkpoint import load_full
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


@pytest.fixture(scope="module")
def one_worker_run(tiny_pairs, tiny_toy_model_dir, tmp_path_factory):
    """One finished 1-worker run (3 steps, a report every step, checkpoints at steps 2 and 3, one torch thread)
    that writes to every metrics backend at once (TensorBoard, MLflow's local file store, W&B offline); the tests
    below only read it. Returns (Ray Train result, logdir, config)."""
    from pipeline.training.config import TrainConfig

    tmp = tmp_path_factory.mktemp("one_worker")
    cfg = TrainConfig(model=str(tiny_toy_model_dir), objective={"name": "ddspo", "safeguard": {"mu": 0.5}}, lr=1e-3,
                      max_steps=3, batch_size=2, log_every=1, checkpoint_every=2, ema_decay=0.9, torch_threads=1,
                      report_to=("tensorboard", "mlflow", "wandb"))
    result = run_training(cfg, tiny_pairs, tmp, "one", logdir=tmp / "tb")
    return result, tmp / "tb", cfg


def test_one_worker_trains_and_checkpoints(one_worker_run, tiny_toy_model_dir):
    result, logdir, _ = one_worker_run
    # a metrics report every log_every step, independent of the checkpoints (steps 2 and 3)
    progress = [json.loads(line) for line in (logdir / "progress.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress] == [1, 2, 3]
    events = list(logdir.glob("events.out.tfevents.*"))
    assert events
    assert sorted(step for step, tag, _ in read_events(events[0]) if tag == "train/loss") == [1, 2, 3]
    m = result.metrics
    for key in ("loss", "residual_w", "margin", "implicit_acc", "lambda_mean", "grad_norm", "pairs_per_s", "step"):
        assert key in m, key
    assert m["step"] == 3
    with result.checkpoint.as_directory() as d:
        parts = load_full(d, {"model", "ema"})
    trained = parts["model"]
    assert parts["ema"]
    initial = load_file(str(tiny_toy_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def test_ray_worker_equals_in_process_engine(one_worker_run, tiny_pairs, tmp_path):
    """Same pairs, seeds and settings: the Ray Train worker's weights and EMA are the in-process engine's, bit for bit."""
    from pipeline.data.schema import read_pairs
    from pipeline.training import PairData, train_in_process
    from pipeline.training.checkpoint import save_checkpoint

    result, _, cfg = one_worker_run
    threads = torch.get_num_threads()
    try:
        local = train_in_process(cfg, PairData.from_table(read_pairs(tiny_pairs)))
        save_checkpoint(local, tmp_path, {"step": local.step})
    finally:
        torch.set_num_threads(threads)
    with result.checkpoint.as_directory() as d:
        worker = load_full(d, {"model", "ema"})
    in_process = load_full(tmp_path, {"model", "ema"})
    for part in ("model", "ema"):
        assert worker[part] and set(worker[part]) == set(in_process[part])
        assert all(torch.equal(worker[part][k], in_process[part][k]) for k in worker[part]), part


def test_two_workers_stream_shard_and_resume_onto_other_worker_counts(tiny_pairs, tiny_train_config,
                                                                     tiny_toy_model_dir, tmp_path):
    """FSDP2 over two workers streaming their splits of the Parquet files; each rank writes its own checkpoint
    shards; the run then resumes onto one worker (2 → 1) and back onto two (1 → 2), the step count, the history
    and AdamW's state continuing where they stopped; the last run uploads its checkpoints asynchronously (Ray Train's
    background upload) and its result is the same complete checkpoint."""
    # the exact (parameter-space) SDPO λ takes gradients of sharded (DTensor) parameters
    cfg = dict(stream_pairs=True, log_every=1,
               objective={"name": "sipo", "safeguard": {"mu": 0.0, "space": "parameter"}})
    first = run_training(tiny_train_config(**cfg, num_workers=2), tiny_pairs, tmp_path, "run")
    assert first.metrics["step"] == 2
    assert 0.0 <= first.metrics["lambda_mean"] <= 1.0
    with first.checkpoint.as_directory() as d:
        files = {p.name for p in Path(d).iterdir()}
        full = load_full(d, {"model", "optim"})
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "rank_0.pt", "rank_1.pt"} <= files  # a shard per rank
    initial = load_file(str(tiny_toy_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {k: v.shape for k, v in full["model"].items()} == {k: v.shape for k, v in initial.items()}
    assert any(not torch.equal(full["model"][k], initial[k]) for k in initial)

    def adam_steps(result) -> set:
        with result.checkpoint.as_directory() as d:
            return {float(s["step"]) for s in load_full(d, {"optim"})["optim"]["state"].values()}

    assert adam_steps(first) == {2.0}
    for workers, steps, upload in ((1, 4, False), (2, 6, True)):  # the last one uploads its checkpoints asynchronously
        resumed = run_training(tiny_train_config(**cfg, num_workers=workers, max_steps=steps,
                                                 async_checkpoint_upload=upload), tiny_pairs, tmp_path, "run")
        assert resumed.metrics["step"] == steps and resumed.metrics["resumed_from_step"] == steps - 2
        assert adam_steps(resumed) == {float(steps)}  # the moments were loaded (resharded), not restarted
        with resumed.checkpoint.as_directory() as d:
            history = json.loads((Path(d) / "history.json").read_text())
        assert [h["step"] for h in history] == list(range(1, steps + 1))


def test_too_few_pairs_is_a_clear_error(tiny_pairs, tiny_train_config, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch per worker"):
        run_training(tiny_train_config(batch_size=64), tiny_pairs, tmp_path, "big")


def test_metrics_go_to_mlflow_in_a_local_file_store(one_worker_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    _, logdir, _ = one_worker_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this reader; the tracker sets it where it writes
    client = MlflowClient((logdir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("one").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert run.data.params["objective.name"] == "ddspo" and run.data.params["lr"] == "0.001"


def read_wandb_history(path):
    """(step, metrics) of every history record in an offline ``.wandb`` file: LevelDB-log framing (32 KiB blocks,
    7-byte record headers; full / first / middle / last fragments) after a 7-byte W&B header, around W&B's own
    ``Record`` protos."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, partial = open(path, "rb").read(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
            partial = b""
    out = []
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out.append((items["_step"], items))
    return out


def test_metrics_go_to_wandb_offline(one_worker_run):
    _, logdir, _ = one_worker_run
    (run_file,) = (logdir / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    history = read_wandb_history(run_file)
    assert [step for step, _ in history] == [1, 2, 3]
    assert all("train/loss" in items and "train/implicit_acc" in items for _, items in history)


def test_the_metrics_callback_loads_without_the_engine():
    """Ray Train's controller unpickles the metrics callback on every run: importing it must not pull in torch and
    the models (``pipeline/training/__init__.py`` loads its names lazily), while the package's names still work."""
    import subprocess
    import sys

    code = ("import sys, pipeline.training.tracking; assert 'torch' not in sys.modules, 'torch imported'; "
            "from pipeline.training import TrainEngine, TrainConfig, preference_step; print(TrainEngine.__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "TrainEngine", run.stderr[-2000:]
    import pipeline.training as training

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        training.Nope  # noqa: B018
