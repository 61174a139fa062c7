"""The main job submitted to a real local Ray cluster with the real CLI: ``ray start`` + ``ray job submit``.

The cluster is started with its own temp dir and free ports; teardown stops exactly the processes of that
cluster (found by its temp dir or GCS port, plus their descendants) rather than ``ray stop --force``, which
kills every Ray process on the machine by name, including other users' clusters and local ``ray.init()`` runs.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` the job's entrypoint runs


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_processes(temp_dir: str, gcs_port: int) -> list[psutil.Process]:
    """This cluster's processes: those whose command line names its temp dir or its GCS address (the Ray
    client server names only the latter), and all their descendants (workers, agents, the job's driver)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a or (a.startswith("--") and a.endswith(f":{gcs_port}")) for a in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """What ``ray stop --force`` does, for this cluster only: freeze its processes (so none starts another),
    find them again with their descendants, SIGKILL them all."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        procs = _cluster_processes(temp_dir, gcs_port)
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
    psutil.wait_procs(procs, timeout=15)


@pytest.fixture()
def ray_cluster():
    """A head node started with ``ray start`` (dashboard + job server on); yields (dashboard URL, temp dir, env)."""
    temp_dir = tempfile.mkdtemp(prefix="raytest_", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    gcs, dashboard, client, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray enables token auth for `ray start` when ~/.ray/auth_token exists (any earlier local ray.init()
    # writes one), but the `ray job` client only sends the token when RAY_AUTH_MODE=token is set. Make it
    # explicit and hermetic: token auth on, with a token of this test's own, for the cluster and the client.
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    env.pop("RAY_AUTH_TOKEN", None)
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={gcs}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--object-store-memory=300000000",
         "--disable-usage-stats"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert start.returncode == 0, f"ray start failed:\n{start.stdout}\n{start.stderr}"
        yield f"http://127.0.0.1:{dashboard}", Path(temp_dir), env
    finally:
        _stop_cluster(temp_dir, gcs)
        left = _cluster_processes(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"cluster processes still running: {[(p.pid, p.name()) for p in left]}"


def test_main_job_runs_via_ray_job_submit(ray_cluster, tiny_toy_model_dir, tmp_path):
    address, temp_dir, env = ray_cluster
    config = tmp_path / "rounds.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_toy_model_dir), "rounds": 1,
        "eval": {"num_prompts": 3, "samples": 2,
                 "sampler": {"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 16}},
        "generation": {"strategy": "ddspo-paired", "prompt_limit": 8, "batch_size": 8,
                       "sampler": {"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 8}},
        "train": {"objective": "ddspo", "lr": 1e-3, "max_steps": 2, "batch_size": 4, "checkpoint_every": 1},
        "select": {"name": "validation", "num_prompts": 2, "samples": 1},  # the start (the base model) competes too
    }))
    run = tmp_path / "run"
    job_id = f"test_submit_{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", ".",
         "--", "python", "jobs/iterative_sipo.py", "--config", str(config), "--run-dir", str(run)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    output = f"{submit.stdout}\n{submit.stderr}"
    if submit.returncode != 0:
        logs = temp_dir / "session_latest" / "logs"
        driver = logs / f"job-driver-{job_id}.log"
        detail = driver.read_text()[-6000:] if driver.exists() else f"no driver log; logs: {sorted(p.name for p in logs.glob('*'))}"
        pytest.fail(f"ray job submit exited {submit.returncode}:\n{output[-4000:]}\n--- {driver.name} ---\n{detail}")
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    assert "done in" in output  # the job's own last line, streamed back by the client

    check_one_round(run, config, output)

    # the working dir the cluster unpacked: the repo's code, without what .gitignore lists
    unpacked = [p for p in (temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").iterdir() if p.is_dir()]
    assert len(unpacked) == 1, unpacked
    assert (unpacked[0] / "jobs" / "iterative_sipo.py").is_file() and (unpacked[0] / "pipeline" / "rounds.py").is_file()
    for ignored in (".venv", "runs", "diffusion_preference_pipeline.egg-info", ".git"):
        assert not (unpacked[0] / ignored).exists(), f"{ignored} was uploaded with the working dir"


def check_one_round(run: Path, config: Path, output: str) -> None:
    """Everything one round of the main job writes, and what a rerun does: skip a finished round, refuse another
    config naming its dotted fields. (The one full run of the round loop with a plain config; tests/test_rounds.py
    covers the loop's options on in-process runs.)"""
    import json

    from pipeline.backbones import load_backbone
    from pipeline.cli import resolve
    from pipeline.rounds import RoundsConfig, run_rounds
    from pipeline.utils.run_record import ConfigMismatch

    for f in ("summary.md", "summary.json", "reward.png", "curves.png", "round_0/_COMPLETE", "round_0/grid.png",
              "final_model"):
        assert (run / f).exists(), f"{f} missing; job output:\n{output[-4000:]}"
    assert not (run / ".round_0.work").exists()
    assert "| round 0 |" in (run / "summary.md").read_text()
    rows = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in rows] == ["reference", "round 0"]
    assert 0.0 <= rows[1]["win_rate_vs_ref"] <= 1.0
    assert rows[0]["delta_vs_ref"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert rows[1]["delta_vs_ref"]["ci_low"] <= rows[1]["delta_vs_ref"]["mean"] <= rows[1]["delta_vs_ref"]["ci_high"]
    metrics = json.loads((run / "round_0" / "train_metrics.json").read_text())
    assert metrics["last"]["step"] == 2 and len(metrics["history"]) == 2
    selection = metrics["selection"]  # checkpoint selection on validation prompts, the starting model included
    assert [v["step"] for v in selection["validation"]] == [0, 1, 2]
    assert selection["selected_step"] == max(selection["validation"], key=lambda v: v["reward"])["step"]
    assert "select · validation reward" in output
    assert load_backbone(run / "final_model").latent_shape() == (3, 32, 32)  # the exported policy loads like any model
    record = json.loads((run / "run_config.json").read_text())
    assert record["job"] == "iterative_sipo" and record["config"]["train"]["lr"] == 1e-3

    sys.path.insert(0, str(REPO / "jobs"))
    import iterative_sipo

    cfg = resolve(iterative_sipo.parse_args(["--config", str(config)]), RoundsConfig)
    logs: list[str] = []
    run_rounds(cfg, run, log=logs.append)  # a finished round is skipped: nothing runs, so no Ray is needed
    assert logs == ["round 0: complete, skipped"]
    from dataclasses import replace

    # more rounds may be asked for; anything else is refused, naming the dotted fields
    with pytest.raises(ConfigMismatch, match=r"eval\.num_prompts: 3 -> 5; train\.lr: 0\.001 -> 0\.0001"):
        run_rounds(replace(cfg, train=replace(cfg.train, lr=1e-4), eval=replace(cfg.eval, num_prompts=5)), run)
