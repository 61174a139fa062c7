"""Jobs run offline and local-only: a real job inside a network namespace with nothing but loopback, the offline
settings reach every Ray worker, a local Ray listens on loopback only, and reward configs that name hub
resources are refused."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from console_checks import check_generation_console
from pipeline.rewards import build_reward
from pipeline.rewards.base import RewardModelError
from pipeline.rewards.hps import hub_references
from pipeline.utils import driver
from pipeline.utils.driver import OFFLINE_ENV, ray_init_kwargs

ROOT = Path(__file__).resolve().parents[1]

#: Written into every Python process of the job (driver, Ray's own processes, workers) through PYTHONPATH: it
#: records the process's offline variables at start and exit, and (audit hook) every connect / sendto / name
#: lookup that leaves loopback, to $NETPROBE_DIR/<pid>.*.json.
PROBE = textwrap.dedent('''
    import atexit, ipaddress, json, os, socket, sys

    _DIR = os.environ["NETPROBE_DIR"]
    _KEYS = %r
    _LOCAL = {"", "localhost", socket.gethostname()}
    _events = []

    def _local(host):
        if host is None or host in _LOCAL:
            return True
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        try:
            return ipaddress.ip_address(str(host).split("%%")[0]).is_loopback
        except ValueError:
            return False

    def _write(when):
        record = {"pid": os.getpid(), "argv": sys.argv[:2], "env": {k: os.environ.get(k) for k in _KEYS},
                  "events": _events}
        with open(os.path.join(_DIR, f"{os.getpid()}.{when}.json"), "w") as f:
            json.dump(record, f)

    def _hook(event, args):
        try:
            if event in ("socket.connect", "socket.sendto"):
                addr = args[1]
                if isinstance(addr, tuple) and addr and not _local(addr[0]):
                    _events.append([event, repr(addr)])
                    _write("events")
            elif event in ("socket.getaddrinfo", "socket.gethostbyname") and not _local(args[0]):
                _events.append([event, repr(args[0])])
                _write("events")
        except Exception as err:  # the probe never breaks the process it watches
            _events.append(["probe-error", repr(err)])

    _write("start")
    atexit.register(_write, "exit")
    sys.addaudithook(_hook)
''') % (tuple(OFFLINE_ENV),)

#: A fresh network namespace has a loopback interface that is down: bring it up (SIOCSIFFLAGS), no iproute2.
LO_UP = textwrap.dedent('''
    import fcntl, socket, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ifr = fcntl.ioctl(s, 0x8913, struct.pack("16sH14s", b"lo", 0, b""))  # SIOCGIFFLAGS
    flags = struct.unpack("16sH14s", ifr)[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 0x1, b""))  # SIOCSIFFLAGS, IFF_UP
''')

#: Ray 2.60's dashboard head (UsageStatsHead.run) asks the cloud metadata endpoints which cloud it runs on at
#: every start, whatever RAY_USAGE_STATS_ENABLED says; without a network they fail at once. Nothing of ours.
RAY_CLOUD_PROBE = {"'169.254.169.254'", "('169.254.169.254', 80)", "'metadata.google.internal'",
                   "('metadata.google.internal', 80)"}


def _unshare_prefix() -> list[str] | None:
    """``unshare -n`` (root), else ``unshare -r -n`` (an unprivileged user namespace), else None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def _records(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.json")):
        try:
            out.append({**json.loads(f.read_text()), "file": f.name})
        except ValueError:  # a process killed mid-write
            pass
    return out


@pytest.mark.slow
def test_a_job_runs_with_no_network_and_every_worker_is_offline(tmp_path):
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("`unshare -n` (and `unshare -r -n`) is not permitted here: cannot make a network namespace")
    hook, probe = tmp_path / "hook", tmp_path / "probe"
    hook.mkdir()
    probe.mkdir()
    (hook / "sitecustomize.py").write_text(PROBE)
    (tmp_path / "lo_up.py").write_text(LO_UP)
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and k != "RAY_ADDRESS"}
    env.update(NETPROBE_DIR=str(probe), PYTHONPATH=os.pathsep.join([str(hook), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = tmp_path / "pairs"
    job = [sys.executable, str(ROOT / "jobs" / "generate_pairs.py"), "--out", str(out), "--num-cpus", "2",
           "--set", "prompt_limit=4", "samples_per_prompt=2", "sampler.num_steps=2"]
    script = f"{sys.executable} {tmp_path / 'lo_up.py'} && exec " + " ".join(job)
    run = subprocess.run([*prefix, "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, output
    assert "pairs from" in run.stdout and (out / "manifest.json").is_file(), output
    check_generation_console(run.stdout + run.stderr, prompts=4, samples=2)  # and its console is the job's own

    records = _records(probe)
    driver_start = [r for r in records if r["file"].endswith(".start.json") and r["argv"][0].endswith("generate_pairs.py")]
    driver_exit = [r for r in records if r["file"].endswith(".exit.json") and r["argv"][0].endswith("generate_pairs.py")]
    assert len(driver_start) == 1 and len(driver_exit) == 1, [r["argv"] for r in records]
    assert not any(driver_start[0]["env"].values()), driver_start  # the test passed none of them in …
    assert driver_exit[0]["env"] == OFFLINE_ENV  # … the job set them itself
    workers = [r for r in records if r["file"].endswith(".start.json") and r["argv"][0].endswith("default_worker.py")]
    assert workers, [r["argv"] for r in records]  # Ray workers ran the job's tasks and actors
    for w in workers:
        assert w["env"] == OFFLINE_ENV, w
        assert "--node-ip-address=127.0.0.1" in w["argv"], w
    # nothing tried to leave loopback (connect, sendto, name lookups), except Ray's own cloud probe
    left = [(r["argv"][0], e) for r in records for e in r["events"]
            if not (e[1] in RAY_CLOUD_PROBE and r["argv"][0].endswith("dashboard.py"))]
    assert not left, left


def test_local_ray_listens_on_loopback_only(tmp_path):
    script = textwrap.dedent('''
        import json, ipaddress, os, psutil, ray
        from pipeline.utils import driver
        from pipeline.utils.driver import start_ray
        start_ray(1)
        ray.get(ray.remote(lambda: os.getpid()).remote())
        listening = []
        for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                pass
        print("RESULT=" + json.dumps({"node_ip": ray.util.get_node_ip_address(), "listening": listening,
                                      "train_env": {k: os.environ.get(k) for k in driver.LOCAL_ENV},
                                      "worker_env": ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in
                                                    ("HF_HUB_OFFLINE", "RAY_USAGE_STATS_ENABLED")}).remote())}))
        ray.shutdown()
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", driver.NODE_IP_ENV)}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT=")), None)
    assert run.returncode == 0 and line, (run.stdout + run.stderr)[-4000:]
    result = json.loads(line[len("RESULT="):])
    assert result["node_ip"] == "127.0.0.1"
    assert result["worker_env"] == {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    assert result["train_env"] == driver.LOCAL_ENV  # a local instance: no preemption watcher per training run
    assert len(result["listening"]) >= 3, result  # GCS, raylet, workers, agents
    import ipaddress

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return addr.is_loopback or (addr.version == 6 and addr.ipv4_mapped is not None and addr.ipv4_mapped.is_loopback)

    assert all(loopback(ip) for _, ip, _ in result["listening"]), result["listening"]


# -- ray.init arguments ----------------------------------------------------------------------------------
@pytest.fixture()
def clean_env(monkeypatch):
    for k in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", driver.NODE_IP_ENV):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_local_start_is_loopback_and_passes_the_offline_env_to_workers(clean_env):
    kw = ray_init_kwargs(num_cpus=2)
    assert kw["_node_ip_address"] == "127.0.0.1" and kw["dashboard_host"] == "127.0.0.1"
    assert kw["include_dashboard"] is False and kw["num_cpus"] == 2
    assert kw["runtime_env"] == {"env_vars": OFFLINE_ENV}
    assert {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"} <= set(OFFLINE_ENV)


def test_the_user_can_choose_another_address(clean_env):
    clean_env.setenv(driver.NODE_IP_ENV, "10.1.2.3")
    assert ray_init_kwargs()["_node_ip_address"] == "10.1.2.3"
    assert ray_init_kwargs(node_ip_address="10.9.9.9")["dashboard_host"] == "10.9.9.9"


def test_joining_a_cluster_keeps_ray_defaults(clean_env):
    clean_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    kw = ray_init_kwargs(num_cpus=2)
    assert not {"_node_ip_address", "dashboard_host", "num_cpus"} & set(kw)
    assert kw["runtime_env"] == {"env_vars": OFFLINE_ENV}  # workers still go offline


def test_under_ray_job_submit_the_submitters_env_vars_win(clean_env):
    # Ray refuses to merge a driver runtime_env that repeats an env var of the submitted job's runtime_env
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"HF_HUB_OFFLINE": "0"}}}
    clean_env.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    kw = ray_init_kwargs()
    assert "_node_ip_address" not in kw
    assert kw["runtime_env"]["env_vars"] == {k: v for k, v in OFFLINE_ENV.items() if k != "HF_HUB_OFFLINE"}


def test_offline_mode_sets_the_environment(clean_env):
    for k in OFFLINE_ENV:
        clean_env.setenv(k, "0")
    assert driver.offline_mode() == OFFLINE_ENV
    assert all(os.environ[k] == v for k, v in OFFLINE_ENV.items())


# -- reward configs that name hub resources --------------------------------------------------------------
def _hps_config(tmp_path: Path, text_cfg: dict, name: str = "hub-tower-test") -> Path:
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
           "text_cfg": text_cfg}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "HPS_v2.1_compressed.pt"
    path.write_bytes(b"never read: the config is refused first")
    return path


@pytest.mark.parametrize("text_cfg, field", [
    ({"hf_model_name": "roberta-base", "hf_tokenizer_name": "roberta-base", "hf_proj_type": "mlp"},
     "text_cfg.hf_model_name='roberta-base'"),
    ({"hf_model_name": "hf-hub:org/text-tower"}, "text_cfg.hf_model_name='hf-hub:org/text-tower'"),
    ({"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
      "hf_tokenizer_name": "bert-base-uncased"}, "text_cfg.hf_tokenizer_name='bert-base-uncased'"),
    ({"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
      "pretrained": "laion2b_s34b_b79k"}, "text_cfg.pretrained='laion2b_s34b_b79k'"),
])
def test_hps_refuses_a_config_naming_a_hub_text_tower(tmp_path, checkpoint, text_cfg, field):
    config = _hps_config(tmp_path, text_cfg)
    with pytest.raises(RewardModelError, match="names a hub resource") as err:
        build_reward({"name": "hps", "path": str(checkpoint), "model_config": str(config)})
    assert field in str(err.value) and str(config) in str(err.value)


def test_hps_refuses_hub_model_names(checkpoint):
    with pytest.raises(RewardModelError, match=r"model_name='hf-hub:laion/CLIP-ViT-H-14"):
        build_reward({"name": "hps", "path": str(checkpoint), "model_name": "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"})
    # an open_clip built-in whose text tower is a Hugging Face model
    with pytest.raises(RewardModelError, match=r"model_name='coca_roberta-ViT-B-32'.*text_cfg\.hf_model_name='roberta-base'"):
        build_reward({"name": "hps", "path": str(checkpoint), "model_name": "coca_roberta-ViT-B-32"})


def test_local_text_towers_and_files_are_accepted(tmp_path):
    tower = tmp_path / "roberta"
    tower.mkdir()
    weights = tmp_path / "text.pt"
    weights.write_bytes(b"")
    assert hub_references({"text_cfg": {"hf_model_name": str(tower), "hf_tokenizer_name": str(tower),
                                        "pretrained": str(weights), "hf_model_pretrained": True}}) == []
    assert hub_references({"text_cfg": {"tokenizer_kwargs": {"reduction_mask": "syntax"}}}) == [
        "text_cfg.tokenizer_kwargs.reduction_mask='syntax' (downloads nltk data)"]
