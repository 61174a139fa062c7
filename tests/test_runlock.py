"""One job per run directory (pipeline/utils/runlock.py) and the clean-up of killed writes' leftovers
(pipeline/utils/atomic.py: clean_stale_temporaries)."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.utils.atomic import RUN_LOCK_NAME, atomic_directory, clean_stale_temporaries, is_complete
from pipeline.utils.runlock import RunDirLocked, lock_file_for, read_holder, refuse_if_locked, run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pipeline.utils.runlock import run_lock
with run_lock(sys.argv[1], sibling=sys.argv[2] == "1"):
    print("READY", flush=True)
    time.sleep(600)
"""
TAKE = """
import sys
from pipeline.utils.runlock import run_lock
with run_lock(sys.argv[1], sibling=sys.argv[2] == "1"):
    print("TOOK", flush=True)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def holder():
    """``start(path, sibling=False)``: a process holding the lock on ``path`` (killed at teardown)."""
    procs: list[subprocess.Popen] = []

    def start(path: Path, sibling: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "1" if sibling else "0"], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_second_job_exits_at_once_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, holder):
    run = tmp_path / "run"
    first = holder(run)
    record = read_holder(run / RUN_LOCK_NAME)
    assert record["pid"] == first.pid and record["host"] == socket.gethostname() and record["command"]

    second = _python(TAKE, str(run), "0", timeout=60)  # it does not wait for the lock (a wait would time out)
    assert second.returncode == 1 and "TOOK" not in second.stdout
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
    assert str(run) in second.stderr

    first.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays, but the OS dropped the flock
    first.wait(timeout=30)
    assert (run / RUN_LOCK_NAME).exists()
    third = _python(TAKE, str(run), "0")
    assert third.returncode == 0 and "TOOK" in third.stdout, third.stderr
    assert f"taking over the stale lock of pid {first.pid}" in third.stderr
    assert not (run / RUN_LOCK_NAME).exists()  # released cleanly this time


@pytest.mark.parametrize("job, args, sibling", [
    ("iterative_sipo.py", ["--run-dir", "{d}"], False),
    ("generate_pairs.py", ["--out", "{d}"], True),
    ("sweep.py", ["--out", "{d}"], False),
    ("evaluate_toy.py", ["--out", "{d}"], False),
])
def test_jobs_refuse_a_locked_run_directory_before_starting_ray(tmp_path, holder, job, args, sibling):
    run = tmp_path / "run"
    first = holder(run, sibling=sibling)
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / job), *[a.format(d=run) for a in args]], cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Ray instance" not in out.stdout + out.stderr
    assert first.poll() is None and read_holder(lock_file_for(run, sibling=sibling))["pid"] == first.pid


def test_in_process_lock_is_exclusive_and_released(tmp_path):
    run = tmp_path / "run"
    with run_lock(run) as lock_file:
        assert lock_file == run / RUN_LOCK_NAME and read_holder(lock_file)["pid"] == os.getpid()
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} on host"):
            with run_lock(run):
                pass
        assert lock_file.exists()  # the refused attempt left the holder's file alone
    assert not lock_file.exists()
    with pytest.raises(ValueError):
        with run_lock(run):
            raise ValueError("boom")
    with run_lock(run):  # released on error too
        pass


def test_sibling_lock_does_not_create_the_output_and_cleans_its_leftovers(tmp_path):
    out = tmp_path / "pairs"
    (tmp_path / ".pairs.tmp-12345678").mkdir()  # a killed generate_pairs.py run
    (tmp_path / ".other.tmp-12345678").mkdir()  # not this output's
    with run_lock(out, sibling=True) as lock_file:
        assert lock_file == tmp_path / ".pairs.lock" and not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-12345678", ".pairs.lock"]
    assert not lock_file.exists()


# -- clean_stale_temporaries --------------------------------------------------------------------------------
def test_a_kill_during_an_atomic_write_leaves_leftovers_that_the_next_job_removes(tmp_path):
    run = tmp_path / "run"
    code = """
import os, signal, sys
from pipeline.utils.atomic import atomic_directory
with atomic_directory(sys.argv[1] + "/round_0", marker=True) as tmp:
    (tmp / "eval.json").write_text("{}")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    assert _python(code, str(run)).returncode == -signal.SIGKILL
    left = [p.name for p in run.iterdir()]
    assert len(left) == 1 and left[0].startswith(".round_0.tmp-"), left
    logs: list[str] = []
    with run_lock(run, log=logs.append):
        assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK_NAME]
    assert any("cleaned up 1 leftover" in m and left[0] in m for m in logs), logs


def _swap_leftovers(folder: Path, name: str, tag: str) -> tuple[Path, Path]:
    tmp, old = folder / f".{name}.tmp-{tag}", folder / f".{name}.old-{tag}"
    for d, text in ((tmp, "new"), (old, "old")):
        d.mkdir(parents=True)
        (d / "_COMPLETE").write_text("ok\n")
        (d / "which").write_text(text)
    return tmp, old


def test_clean_removes_leftovers_and_keeps_everything_else(tmp_path):
    (tmp_path / "round_0").mkdir()
    (tmp_path / ".round_1.tmp-0123abcd").mkdir()                   # atomic_directory, killed while writing
    (tmp_path / ".round_0.old-89abcdef").mkdir()                   # killed while removing the old one
    (tmp_path / ".summary.md.tmp-deadbeef").write_text("half")     # atomic_write_bytes
    (tmp_path / ".policy.safetensors.a1b_c2d3.tmp").write_text("")  # tempfile.mkstemp (export)
    nested = tmp_path / ".round_2.work" / "pairs"
    nested.mkdir(parents=True)
    (tmp_path / ".round_2.work" / ".pairs.tmp-00000000").mkdir()    # generate() inside a round's work folder
    keep = [".round_2.work", "round_0", ".hidden", ".x.tmp-notahex!", ".y.tmp-0123abc", "z.tmp-0123abcd"]
    for name in keep[2:]:
        (tmp_path / name).write_text("keep")
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([".round_1.tmp-0123abcd", ".round_0.old-89abcdef",
                                                      ".summary.md.tmp-deadbeef", ".policy.safetensors.a1b_c2d3.tmp",
                                                      ".pairs.tmp-00000000"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert [p.name for p in (tmp_path / ".round_2.work").iterdir()] == ["pairs"]
    assert clean_stale_temporaries(tmp_path) == []


def test_clean_finishes_a_swap_that_was_killed_between_its_renames(tmp_path):
    # atomic_directory renamed dest → .old-<tag>, then died before .tmp-<tag> → dest: put the new one in place
    _swap_leftovers(tmp_path, "round_0", "0000aaaa")
    clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0"]
    assert (tmp_path / "round_0" / "which").read_text() == "new" and is_complete(tmp_path / "round_0")
    # with dest present, both are just leftovers
    _swap_leftovers(tmp_path, "round_0", "0000bbbb")
    clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0"]
    assert (tmp_path / "round_0" / "which").read_text() == "new"


def test_clean_leaves_other_jobs_outputs_alone(tmp_path):
    other_run = tmp_path / "train" / "ray_storage" / "other"      # a run directory with its own live lock
    other_run.mkdir(parents=True)
    (other_run / RUN_LOCK_NAME).write_text("{}")
    (other_run / ".metrics.json.tmp-12345678").write_text("")
    (tmp_path / ".pairs.lock").write_text("{}")                     # generate_pairs writing <tmp_path>/pairs
    (tmp_path / ".pairs.tmp-12345678").mkdir()
    (tmp_path / ".eval.tmp-12345678").mkdir()
    removed = clean_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".eval.tmp-12345678"]
    assert (other_run / ".metrics.json.tmp-12345678").exists() and (tmp_path / ".pairs.tmp-12345678").exists()


def test_clean_by_name_touches_only_that_output(tmp_path):
    (tmp_path / ".pairs.tmp-12345678").mkdir()
    (tmp_path / ".other.tmp-12345678").mkdir()
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / ".manifest.json.tmp-12345678").write_text("")
    removed = clean_stale_temporaries(tmp_path, name="pairs")
    assert sorted(p.name for p in removed) == [".manifest.json.tmp-12345678", ".pairs.tmp-12345678"]
    assert (tmp_path / ".other.tmp-12345678").exists()


def test_atomic_directory_still_works_beside_the_cleanup(tmp_path):
    with run_lock(tmp_path / "run"):
        with atomic_directory(tmp_path / "run" / "out", marker=True) as tmp:
            (tmp / "a").write_text("1")
    assert is_complete(tmp_path / "run" / "out")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["out"]


def test_the_early_check_creates_nothing_and_refuses_only_a_held_lock(tmp_path):
    run = tmp_path / "run"
    refuse_if_locked(run)  # no folder, no lock file: nothing to refuse, nothing created
    assert not run.exists()
    with run_lock(run):
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} on host"):
            refuse_if_locked(run)
    (run / RUN_LOCK_NAME).write_text('{"pid": 1}')  # a lock file nobody holds (a killed job's): not refused
    refuse_if_locked(run)
