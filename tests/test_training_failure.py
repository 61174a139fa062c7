"""A real Ray Train worker SIGKILLed mid-run: the run restarts from its last registered checkpoint (not from
step 0), finishes (``FailureConfig(max_failures=2)`` in ``run_training``), and ends with weights bit-identical
to an uninterrupted run's (the checkpoint holds the sampler position and every RNG state)."""

import json
import os
import signal
import threading
import time

import psutil
import torch
import pytest
from safetensors.torch import load_file

from pipeline.training.trainer import run_training
from pipeline.training.worker import EMA_FILE, WEIGHTS_FILE

pytestmark = pytest.mark.slow

MAX_STEPS, EVERY = 30, 5


def _latest_registered_step(run_dir):
    """The step of the latest checkpoint Ray Train's controller has registered (what a restart resumes from),
    read from its checkpoint-manager snapshot; None before the first."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or caught mid-write
        return None
    return None if latest is None else int(latest["metrics"]["step"])


def _train_workers():
    """Live Ray Train worker processes of this test's own Ray (descendants of this driver; their process
    title is ``ray::RayTrainWorker...``)."""
    procs = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Killer(threading.Thread):
    """Waits for the first registered checkpoint, then SIGKILLs the (single) training worker."""

    def __init__(self, run_dir, done: threading.Event, timeout_s: float = 300):
        super().__init__(daemon=True)
        self.run_dir, self.done, self.timeout_s = run_dir, done, timeout_s
        self.killed_pid = None
        self.step_at_kill = None
        self.error = None
        self.kill_time = None

    def run(self):
        deadline = time.time() + self.timeout_s
        while not self.done.is_set() and time.time() < deadline:
            step = _latest_registered_step(self.run_dir)
            if step is not None:
                if step >= MAX_STEPS:
                    self.error = f"training reached step {step} before the worker could be killed"
                    return
                workers = _train_workers()
                if len(workers) == 1:
                    self.step_at_kill, self.kill_time = step, time.time()
                    workers[0].send_signal(signal.SIGKILL)
                    self.killed_pid = workers[0].pid
                    return
                if len(workers) > 1:
                    self.error = f"expected one training worker, found {[p.pid for p in workers]}"
                    return
            time.sleep(0.1)
        self.error = "no registered checkpoint or no training worker found before the run ended / timed out"


def test_killed_worker_resumes_from_checkpoint_and_finishes(tiny_pairs, tiny_train_config, tmp_path):
    cfg = tiny_train_config(max_steps=MAX_STEPS, checkpoint_every=EVERY, torch_threads=1)
    done = threading.Event()
    killer = Killer(tmp_path / "killed", done)
    killer.start()
    t0 = time.time()
    try:
        result = run_training(cfg, tiny_pairs, tmp_path, "killed", max_failures=2)
    finally:
        done.set()
        killer.join(timeout=60)

    # the kill really happened, to a Ray Train worker, after a checkpoint and before the end
    assert killer.error is None, killer.error
    assert killer.killed_pid is not None and not _alive(killer.killed_pid)
    assert EVERY <= killer.step_at_kill < MAX_STEPS

    # the run finished ...
    assert result.error is None
    assert result.metrics["step"] == MAX_STEPS
    with result.checkpoint.as_directory() as d:
        assert json.loads(open(f"{d}/metrics.json").read())["step"] == MAX_STEPS
    # ... in a worker that restarted from a checkpoint at or after the one registered before the kill, not
    # from step 0 (a run that never failed reports resumed_from_step == 0 throughout)
    resumed = result.metrics["resumed_from_step"]
    assert killer.step_at_kill <= resumed < MAX_STEPS and resumed % EVERY == 0, (resumed, killer.step_at_kill)
    print(f"killed worker {killer.killed_pid} at {killer.kill_time - t0:.0f}s (checkpoint at step {killer.step_at_kill} "
          f"registered); resumed from step {resumed}; finished step {MAX_STEPS} at {time.time() - t0:.0f}s")

    # ... and to exactly the weights (and EMA) of a run that was never interrupted
    straight = run_training(cfg, tiny_pairs, tmp_path, "straight")
    assert straight.metrics["resumed_from_step"] == 0
    for name in (WEIGHTS_FILE, EMA_FILE):
        with result.checkpoint.as_directory() as a, straight.checkpoint.as_directory() as b:
            resumed_w, straight_w = load_file(f"{a}/{name}"), load_file(f"{b}/{name}")
        assert set(resumed_w) == set(straight_w)
        assert all(torch.equal(resumed_w[k], straight_w[k]) for k in resumed_w), name
