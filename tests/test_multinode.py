"""Multi-node placement and the loss of a node, simulated on one machine (``ray.cluster_utils.Cluster``: a head and
one node per stage, each with its own custom resource and label; one shared file system, so one ``storage_path``).

One round of the online loop (``pipeline/rounds.py: run_rounds``, as jobs/iterative_sipo.py runs it) with its
generation actors and its Ray Train worker placed on their own nodes; the generation node is killed while its actor
generates, the training node once a checkpoint is registered, and each is replaced by a node with the same resources
and labels (what an autoscaler does). Where the work ran is read from Ray's actor table, not from the config."""

import json
import os
import shutil
import tempfile
import threading
import time

import pytest
import ray

from pipeline.data.schema import read_pairs
from test_reliability import _registered  # the latest checkpoint Ray Train's controller registered in a run folder

GENERATOR = "MapWorker(MapBatches(GenerateImages))"  # Ray Data names its actor classes after their operator

GEN_NODE = dict(num_cpus=1, resources={"generator": 1}, labels={"stage": "generate"})
TRAIN_NODE = dict(num_cpus=1, resources={"trainer": 1}, labels={"stage": "train"})
#: a killed node is declared dead after ~1.5 s of refused health checks (Ray's default: 15 s); a live but busy
#: node is not, since each check still waits Ray's default timeout
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                   "health_check_failure_threshold": 3}


@pytest.fixture()
def cluster(monkeypatch):
    """A head (the driver's node, with Ray Train's controller; Ray Data's light stages go to any node) plus a
    generation node and a training node, joined by this process as a job's driver joins a cluster (``start_ray``
    with ``RAY_ADDRESS``).
    Afterwards every process started under the cluster's temp dir is killed."""
    from ray.cluster_utils import Cluster

    from pipeline.utils.driver import start_ray

    if ray.is_initialized():  # start_ray ignores a re-init: make sure this process joins the cluster below
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: Ray's socket paths live under it
    cl = Cluster(initialize_head=True, connect=False, head_node_args=dict(
        num_cpus=1, temp_dir=temp, include_dashboard=False, _system_config=FAST_NODE_DEATH))
    try:
        nodes = {"generate": cl.add_node(**GEN_NODE), "train": cl.add_node(**TRAIN_NODE)}
        monkeypatch.setenv("RAY_ADDRESS", cl.address)
        # no node here is drained (they are killed): Ray Train's drain watcher would be one more process on 2 cores
        monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        start_ray()
        yield cl, nodes
    finally:
        ray.shutdown()
        cl.shutdown()
        _kill_started_under(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_started_under(temp: str) -> None:
    """SIGKILL what is left of the processes whose command line names this cluster's temp dir (its raylets, GCS,
    agents and workers); no other process names it."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and temp in " ".join(p.info["cmdline"] or []):
                p.kill()
        except psutil.Error:
            pass


def _actors(class_name: str) -> list[dict]:
    """Every actor of a class (alive, restarting or dead) with the node it runs or ran on, from the GCS actor table
    (the public state API, ``ray.util.state``, needs the dashboard, which this cluster does not start)."""
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == class_name]


def test_placement_fields_are_checked_and_reach_ray_train():
    from pipeline.config import ConfigError, build
    from pipeline.rounds import RoundsConfig
    from pipeline.utils.placement import train_worker_resources

    with pytest.raises(ConfigError, match=r"generation\.actor_resources=\{'GPU': 1\}: expected custom resource names"):
        build(RoundsConfig, {"generation": {"actor_resources": {"GPU": 1}}})
    with pytest.raises(ConfigError, match=r"train\.worker_resources=\{'trainer': 0\}: expected a positive number"):
        build(RoundsConfig, {"train": {"worker_resources": {"trainer": 0}}})
    with pytest.raises(ConfigError, match=r"train\.worker_labels=\{'zone': 3\}: expected a mapping of node label"):
        build(RoundsConfig, {"train": {"worker_labels": {"zone": 3}}})
    cfg = build(RoundsConfig, {"train": {"worker_resources": {"trainer": 1}}})
    assert train_worker_resources(cfg.train) == {"CPU": 1.0, "trainer": 1.0}  # Ray Train's own default kept
    assert train_worker_resources(build(RoundsConfig, {}).train) is None


@pytest.mark.slow
@pytest.mark.faults
def test_a_round_survives_losing_its_generation_node_and_then_its_training_node(cluster, tiny_toy_model_dir,
                                                                                tiny_pairs_dataset, tmp_path):
    from pipeline.rounds import RoundsConfig, run_rounds

    cl, nodes = cluster
    run = tmp_path / "run"
    work = run / ".round_0.work"
    max_steps, every = 20, 4
    cfg = RoundsConfig(
        model=str(tiny_toy_model_dir), rounds=1, replay=1,  # replay: the round publishes its pairs (read below)
        eval={"num_prompts": 3, "samples": 2,
              "sampler": {"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 16}},
        # tiny_pairs_dataset's generation (an uninterrupted run of the same config), on the generation nodes only
        generation={"strategy": "ddspo-paired", "prompt_limit": 8, "batch_size": 8,
                    "sampler": {"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 8},
                    "actor_resources": {"generator": 1}, "actor_labels": {"stage": "generate"}},
        train={"objective": {"name": "ddspo"}, "lr": 1e-3, "max_steps": max_steps, "batch_size": 2, "torch_threads": 1,
               "checkpoint_every": every, "log_every": every,
               "worker_resources": {"trainer": 1}, "worker_labels": {"stage": "train"}},
    )
    node_ids = {name: {node.node_id} for name, node in nodes.items()}
    outcome: dict = {}

    def round_loop() -> None:
        """The driver's work, in a thread: the main thread starts and kills nodes (starting a node installs a signal
        handler, which Python allows in the main thread only)."""
        try:
            outcome["rows"] = run_rounds(cfg, run, log=lambda msg: None)
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = err

    def wait_for(probe, what: str):
        """Poll ``probe`` until it returns something true (returned), while the round runs."""
        while not (value := probe()):
            assert driver.is_alive(), f"the round ended before {what}: {outcome.get('error')!r}"
            assert time.time() < deadline, f"no {what} within the time limit"
            time.sleep(0.05)
        return value

    def kill_and_replace(name: str) -> None:
        cl.remove_node(nodes[name], allow_graceful=False)  # SIGKILL: its raylet, object store and workers, at once
        node_ids[name].add(cl.add_node(**(GEN_NODE if name == "generate" else TRAIN_NODE)).node_id)

    t0 = time.time()
    deadline = t0 + 300
    driver = threading.Thread(target=round_loop, daemon=True)
    driver.start()
    # 1. the generation node, once its actor is up and before the round's pairs are written
    alive = wait_for(lambda: [a for a in _actors(GENERATOR) if a["State"] == "ALIVE"], "running generation actor")
    assert not (work / "pairs").exists(), "the pairs were written before the generation node could be killed"
    kill_and_replace("generate")
    # 2. the training node, once the run has registered a checkpoint
    step_at_kill = int(wait_for(lambda: _registered(work / "ray" / "train"), "checkpoint")["metrics"]["step"])
    kill_and_replace("train")
    driver.join(timeout=max(1.0, deadline - time.time()))
    seconds = time.time() - t0
    assert not driver.is_alive(), f"the round did not finish within {seconds:.0f}s"
    if "error" in outcome:
        raise outcome["error"]
    rows = outcome["rows"]

    # placement, from where the work ran: every generation actor on a generation node (the killed one was restarted
    # on its replacement), every Ray Train worker on a training node (the first on the killed one, then its
    # replacement), none of them on the head
    generators = _actors(GENERATOR)
    assert generators and {a["Address"]["NodeID"] for a in generators} <= node_ids["generate"], (generators, node_ids)
    first_gen = nodes["generate"].node_id
    assert alive[0]["Address"]["NodeID"] == first_gen  # the actor that was killed ran there
    assert any(a["NumRestarts"] >= 1 and a["Address"]["NodeID"] in node_ids["generate"] - {first_gen}
               for a in generators), "the generation actor was not restarted on the replacement node"
    workers = _actors("RayTrainWorker")
    assert {a["Address"]["NodeID"] for a in workers} == node_ids["train"], (workers, node_ids)

    # the round completed once: one published round_0 with its marker, nothing half-written left
    assert (run / "round_0" / "_COMPLETE").is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".round_0")] == []
    assert [r["round"] for r in rows] == ["reference", "round 0"]
    assert [r["round"] for r in json.loads((run / "summary.json").read_text())] == ["reference", "round 0"]

    # its pairs: each once, and the same pairs (ids and latents) as the uninterrupted generation of tiny_pairs_dataset
    pairs = read_pairs(run / "round_0" / "pairs" / "pairs").sort_by("pair_id")
    expected = read_pairs(tiny_pairs_dataset / "pairs").sort_by("pair_id")
    ids = pairs.column("pair_id").to_pylist()
    assert len(ids) == len(set(ids)) == json.loads((run / "round_0" / "pairs_manifest.json").read_text())["num_pairs"]
    assert ids == expected.column("pair_id").to_pylist()
    for column in ("latent_w", "latent_l"):
        assert pairs.column(column).equals(expected.column(column)), column

    # training resumed from the checkpoint registered before the kill (not from step 0) and reached max_steps; each
    # logged window appears once in the round's history
    metrics = json.loads((run / "round_0" / "train_metrics.json").read_text())
    assert metrics["last"]["step"] == max_steps
    assert every <= step_at_kill <= metrics["last"]["resumed_from_step"] < max_steps, (step_at_kill, metrics["last"])
    assert [h["step"] for h in metrics["history"]] == list(range(every, max_steps + 1, every))
    print(f"round with two node losses: {seconds:.0f}s; training node killed at step {step_at_kill}")
