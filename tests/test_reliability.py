"""Fault-injection suite (``-m faults``): bad inputs and corruptions end in a clear error that names the field or
file, user data is never deleted, and nothing non-finite is ever trained on or published. The counts are
recorded in docs/reliability.md."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.schema import MAX_ABS_LATENT, SchemaError, read_pairs
from pipeline.training.config import TrainConfig
from pipeline.utils.atomic import NotOurOutput, atomic_directory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults


# ------------------------------------------------------------------------------------------------ helpers
def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def rewrite_value(src: Path, dst: Path, column: str, row: int, index: int, value: float) -> None:
    """A copy of a Parquet file or folder (as one file) with one latent value replaced (a valid file: only the
    value is wrong)."""
    table = pq.read_table(src) if src.is_file() else pa.concat_tables(pq.read_table(f) for f in parts(src))
    rows = table.column(column).to_pylist()
    rows[row][index] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(rows, type=pa.list_(pa.float32())))
    pq.write_table(table, dst)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_pairs_dataset):
    """The session's tiny pairs (their Parquet folder), without a Ray in this process: the tests here read them or
    hand them to jobs that start a Ray of their own (an idle one here would only take CPU from theirs); the one
    test that runs Ray Train in this process starts and stops its own."""
    return tiny_pairs_dataset / "pairs"


@pytest.fixture()
def dataset(tiny_pairs, tmp_path):
    """A private copy of a finished dataset (manifest.json + pairs/), so a test may corrupt it."""
    import shutil

    dst = tmp_path / "dataset"
    shutil.copytree(Path(tiny_pairs).parent, dst)
    return dst


# ------------------------------------------------------------------------------------------------ user data
def test_an_output_folder_that_is_not_ours_is_never_removed(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(NotOurOutput, match=r"mine already exists and is not a finished output.*thesis\.tex"):
        with atomic_directory(user, marker=True) as tmp:
            (tmp / "x").write_text("new")
    assert (user / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary left behind either


def test_generate_pairs_job_refuses_an_existing_user_folder_before_starting_ray(tmp_path):
    user = tmp_path / "out"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate_pairs.py"), "--out", str(user),
                          "--set", "prompt_limit=2"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "notes.txt" in run.stderr and str(user) in run.stderr and "nothing was removed" in run.stderr
    assert "Traceback" not in run.stderr
    assert (user / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ pairs files
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -6.35e25])
def test_non_finite_or_out_of_range_latents_are_rejected_on_read(tiny_pairs, tmp_path, value):
    bare = tmp_path / "bare"
    bare.mkdir()
    rewrite_value(Path(tiny_pairs), bare / "part-0.parquet", "latent_l", row=1, index=5, value=value)
    with pytest.raises(SchemaError, match=rf"latent_l of 1 pair\(s\).*row 1, pair_id \w+.*±{MAX_ABS_LATENT:g}"):
        read_pairs(bare)


def test_a_changed_file_fails_its_manifest_checksum(dataset):
    part = parts(dataset / "pairs")[0]
    rewrite_value(part, part, "latent_w", row=0, index=0, value=0.123)  # plausible value, valid Parquet
    with pytest.raises(SchemaError, match=r"checksum .* does not match the manifest"):
        read_pairs(dataset / "pairs")


def test_a_flipped_byte_that_keeps_the_footer_readable_is_caught(dataset):
    part = parts(dataset / "pairs")[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the column data, far from the footer
    part.write_bytes(bytes(data))
    with pytest.raises(SchemaError, match=part.name):
        read_pairs(dataset)


def test_an_extra_or_missing_part_is_caught(dataset):
    part = parts(dataset / "pairs")[0]
    (dataset / "pairs" / "extra.parquet").write_bytes(part.read_bytes())
    with pytest.raises(SchemaError, match="differ from those its manifest lists"):
        read_pairs(dataset / "pairs")


def test_infinite_rewards_are_rejected_but_nan_means_unscored(tiny_pairs, tmp_path):
    table = read_pairs(tiny_pairs)
    assert np.isnan(table.column("reward_w").to_numpy()).all()  # label-free DDSPO pairs: NaN is valid
    rewards = table.column("reward_w").to_numpy().copy()
    rewards[2] = np.inf
    bad = table.set_column(table.schema.get_field_index("reward_w"), "reward_w", pa.array(rewards))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"row 2 .* reward_w = inf"):
        read_pairs(tmp_path / "bad.parquet")


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("mu", [-0.5, 1.0, 1.5, -1.0])
def test_sdpo_mu_outside_its_range_is_an_error_not_off(mu):
    """No sentinel: the safeguard is off only when the section is absent (null)."""
    from pipeline.config import ConfigError, build

    with pytest.raises(ConfigError, match=r"train\.objective\.safeguard\.mu=.*expected a slack in \[0, 1\)"):
        build(TrainConfig, {"objective": {"safeguard": {"mu": mu}}}, "train")
    assert not TrainConfig().safeguard_on
    assert TrainConfig(objective={"safeguard": {"mu": 0.0}}).safeguard_on


# ------------------------------------------------------------------------------------------------ publication
def test_non_finite_weights_are_never_published(tmp_path):
    import torch.distributed.checkpoint as dcp

    from pipeline.export import policy_from_checkpoint

    ckpt = tmp_path / "ckpt"
    dcp.save({"model": {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, "ema": {}}, checkpoint_id=str(ckpt))
    with pytest.raises(ValueError, match=r"non-finite .*\bb\b"):
        policy_from_checkpoint(ckpt, tmp_path / "policy.safetensors")
    assert not (tmp_path / "policy.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.slow
def test_nan_pairs_stop_the_train_job_without_publishing(tiny_pairs, tiny_toy_model_dir, tmp_path):
    """Pairs that slipped past the reader (here: NaN latents in memory) stop training at the first step."""
    from pipeline.training import PairData, TrainEngine, TrainingDiverged

    data = PairData.from_table(read_pairs(tiny_pairs))
    data.x0_l[3] = float("nan")
    engine = TrainEngine(TrainConfig(model=str(tiny_toy_model_dir), objective="diffusion-dpo", batch_size=8,
                                     max_steps=2))
    with pytest.raises(TrainingDiverged, match=r"optimizer step 1: non-finite loss .*pair ids \[.*'" + data.pair_ids[3]):
        engine.run(data)


# ------------------------------------------------------------------------------------------------ kills
def _registered(run_dir: Path) -> dict | None:
    """The latest checkpoint Ray Train's controller has registered in a run folder (what a restart or a rerun
    resumes from): its folder name and reported metrics (``step``, ``resumed_from_step``); None before the first."""
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or caught mid-write
        return None


def _train_workers(root: int) -> list:
    """Live Ray Train worker processes under process ``root`` (a job's local Ray runs its workers as the driver's
    descendants; their process title is ``ray::RayTrainWorker...``)."""
    import psutil

    procs = []
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in children:
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_a_killed_train_worker_and_then_driver_resume_to_bit_identical_weights(tiny_pairs, tiny_toy_model_dir, tmp_path):
    """Two SIGKILLs in one run of jobs/train.py, each right after a registered checkpoint. First its Ray Train
    worker: the run restarts it (``FailureConfig(max_failures=2)`` in ``run_training``) from that checkpoint, not
    from step 0. Then, once the restarted worker has registered a checkpoint, the driver and with it its local Ray:
    the rerun takes over the stale lock, resumes from the checkpoint and ends with exactly an uninterrupted run's
    weights and EMA (the checkpoint holds the sampler position and every RNG state)."""
    import os
    import signal
    import time

    from pipeline.training.checkpoint import load_full

    max_steps, every = 24, 4
    settings = [f"model={tiny_toy_model_dir}", "objective.name=sipo", "lr=1e-3", f"max_steps={max_steps}", "batch_size=2",
                f"checkpoint_every={every}", "torch_threads=1", "ema_decay=0.9"]

    def job(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "jobs" / "train.py"), "--pairs", str(tiny_pairs), "--out", str(out),
                "--num-cpus", "2", "--set", *settings]

    killed = tmp_path / "killed"
    run_dir = killed / "ray_storage" / "train"
    proc = subprocess.Popen(job(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # 1. the worker, at the first registered checkpoint
        deadline, step_at_kill, killed_pid, error = time.time() + 420, None, None, None  # for both kills
        while time.time() < deadline and proc.poll() is None and killed_pid is None:
            latest = _registered(run_dir)
            if latest is not None:
                workers = _train_workers(proc.pid)
                if len(workers) > 1:
                    error = f"expected one training worker, found {[w.pid for w in workers]}"
                    break
                if workers:
                    step_at_kill = int(latest["metrics"]["step"])
                    workers[0].send_signal(signal.SIGKILL)
                    killed_pid = workers[0].pid
            time.sleep(0.1)
        assert error is None, error
        assert killed_pid is not None, f"no checkpoint or no training worker to kill (rc {proc.poll()})"
        assert every <= step_at_kill < max_steps, step_at_kill

        # 2. the driver, at the first checkpoint the restarted worker registers
        resumed = None
        while time.time() < deadline and proc.poll() is None:
            latest = _registered(run_dir)
            if latest is not None and latest["metrics"].get("resumed_from_step", 0) > 0:
                resumed = latest["metrics"]
                break
            time.sleep(0.1)
        assert resumed is not None, f"no checkpoint from a restarted worker (rc {proc.poll()})"
        assert proc.poll() is None, "the run ended before its driver could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    # the worker kill really happened, to a Ray Train worker, and the run restarted it from a checkpoint at or
    # after the one registered before the kill, not from step 0 (a run that never failed reports 0 throughout)
    assert not _alive(killed_pid)
    assert step_at_kill <= resumed["resumed_from_step"] < max_steps and resumed["resumed_from_step"] % every == 0, \
        (resumed, step_at_kill)
    step = int(resumed["step"])
    assert step < max_steps
    time.sleep(2)
    assert not (killed / "policy.safetensors").exists()  # nothing published by the killed run

    rerun = subprocess.run(job(killed), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    history = json.loads((killed / "metrics.json").read_text())
    assert history[-1]["step"] == max_steps and history[-1]["resumed_from_step"] >= step
    final = _registered(run_dir)
    assert final["metrics"]["step"] == max_steps
    assert json.loads((run_dir / final["checkpoint_dir_name"] / "metrics.json").read_text())["step"] == max_steps

    # the uninterrupted run: the same engine in this process (a Ray Train worker computes exactly what the
    # in-process engine does: tests/test_training_ray.py::test_ray_worker_equals_in_process_engine)
    from pipeline.config import apply_overrides, build
    from pipeline.training import PairData, train_in_process
    from pipeline.training.checkpoint import save_checkpoint

    threads = torch.get_num_threads()
    try:
        straight = train_in_process(build(TrainConfig, apply_overrides({}, settings)), PairData.from_table(read_pairs(tiny_pairs)))
        b = straight.policy_weights()
        assert straight.history[-1]["resumed_from_step"] == 0
        (tmp_path / "straight").mkdir()
        save_checkpoint(straight, tmp_path / "straight", {"step": straight.step})
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(killed / "policy.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    resumed = load_full(run_dir / final["checkpoint_dir_name"], {"model", "ema"})
    uninterrupted = load_full(tmp_path / "straight", {"model", "ema"})
    for part in ("model", "ema"):  # the final checkpoint: live weights and EMA
        resumed_w, straight_w = resumed[part], uninterrupted[part]
        assert resumed_w and set(resumed_w) == set(straight_w)
        assert all(torch.equal(resumed_w[k], straight_w[k]) for k in resumed_w), part


@pytest.mark.parametrize("override, message", [
    ("model=/nonexistent/sd15", r"error: model: model folder /nonexistent/sd15 does not exist"),
    ("generation.prompts=/nonexistent/prompts.txt", r"error: generation\.prompts: prompt file /nonexistent/prompts\.txt"),
    ("eval.prompts=/nonexistent/heldout.txt", r"error: eval\.prompts: prompt file /nonexistent/heldout\.txt"),
    ("generation.reward={\"name\":\"pickscore\",\"path\":\"/nonexistent/ps\"}",
     r"error: generation\.reward: reward 'pickscore': path=/nonexistent/ps does not exist"),
    ("generation.reward={\"name\":\"pickscor\"}", r"error: generation\.reward: .*pickscor"),
])
def test_missing_inputs_are_refused_before_ray_starts(override, message, tmp_path):
    sys.path.insert(0, str(ROOT / "jobs"))
    import iterative_sipo

    with pytest.raises(SystemExit, match=message):
        iterative_sipo.main(["--run-dir", str(tmp_path / "run"), "--set", override])
    assert not (tmp_path / "run").exists()  # refused before the run directory is locked, so before Ray starts


@pytest.mark.slow
def test_a_deterministic_worker_error_fails_at_once_without_retries(tiny_pairs, tiny_toy_model_dir, tmp_path):
    """A model folder without unet/ reaching a Ray Train worker (run_training called directly, past the jobs'
    preflight): every rank reports it as fatal and the driver raises it — FailureConfig never restarts the
    workers (a retried failure would surface as Ray's own error after max_failures restarts)."""
    import shutil

    from pipeline.training.trainer import TrainingFailed, run_training

    broken = tmp_path / "no_unet"
    shutil.copytree(tiny_toy_model_dir, broken)
    shutil.rmtree(broken / "unet")
    cfg = TrainConfig(model=str(broken), max_steps=2, batch_size=2)
    with pytest.raises(TrainingFailed, match=r"FileNotFoundError: .*no_unet.*unet/"):
        run_training(cfg, tiny_pairs, tmp_path / "ray", "broken", max_failures=2)  # on the session's Ray


@pytest.mark.slow
def test_a_rounds_job_killed_in_generation_then_in_evaluation_completes_once(tiny_toy_model_dir, tmp_path):
    """SIGKILL jobs/iterative_sipo.py while it generates the round's pairs; its rerun takes over the lock, cleans
    the killed write's temporaries, generates the whole dataset again, trains, and is SIGKILLed in turn while it
    evaluates the trained policy; the next rerun takes over the lock again, finishes the round and publishes it
    exactly once (a dataset is published whole by rename, so a killed generation leaves no partial pairs to
    duplicate)."""
    import os
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "jobs" / "iterative_sipo.py"), "--run-dir", str(run), "--num-cpus", "2",
           "--recipe", "defaults", "--set", f"model={tiny_toy_model_dir}", "rounds=1",
           "generation.prompt_limit=12", "generation.samples_per_prompt=2", "generation.batch_size=8",
           "generation.sampler.num_steps=2", "generation.sampler.batch_size=8",
           "train.max_steps=4", "train.batch_size=2", "train.checkpoint_every=2",
           "eval.num_prompts=16", "eval.samples=2", "eval.sampler.num_steps=6"]

    def generating() -> bool:  # the round's pairs are being written (Ray Data has started)
        return (run / ".round_0.work").is_dir() and not (run / ".round_0.work" / "pairs").exists()

    def evaluating() -> bool:  # the trained policy's evaluation is being written
        return any(p.name.startswith(".round_0.tmp-") for p in run.iterdir()) if run.is_dir() else False

    for kill_at, reached in (("generation", generating), ("evaluation", evaluating)):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and not reached():
                time.sleep(0.05)
            assert proc.poll() is None and reached(), f"the job did not reach {kill_at} (rc {proc.poll()})"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
        time.sleep(2)
        assert not (run / "round_0").exists(), kill_at  # nothing published by the killed run
        if kill_at == "evaluation":  # the rerun after the killed generation wrote one finished, checksummed dataset
            pairs = run / ".round_0.work" / "pairs"
            written = json.loads((pairs / "manifest.json").read_text())
            assert read_pairs(pairs / "pairs").num_rows == written["num_pairs"] > 0
            # ... and the killed generation's temporaries (.pairs.tmp-*) are gone: cleaned when the rerun took the lock
            assert [p.name for p in (run / ".round_0.work").iterdir() if p.name.startswith(".pairs.")] == []

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (run / "round_0" / "_COMPLETE").is_file()
    leftovers = [p.name for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".work")]
    assert leftovers == []
    manifest = json.loads((run / "round_0" / "pairs_manifest.json").read_text())
    assert manifest["num_pairs"] == written["num_pairs"] and manifest["parquet_dir"] == "pairs"  # the same dataset
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary] == ["reference", "round 0"]  # published once
