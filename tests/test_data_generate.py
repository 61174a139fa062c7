"""The Ray Data pipeline end to end under a local Ray instance: every strategy, reruns, crashes, bad inputs, and
autoscaling actor pools with an object-store budget (the same pairs as fixed pools)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.generate import GenerationConfig, generate
from pipeline.data.schema import MANIFEST, latents_of, read_pairs
from pipeline.toyworld import train_specs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import generate_pairs  # noqa: E402


pytestmark = pytest.mark.usefixtures("local_ray")  # the session's local Ray (conftest.py)


def small(model_dir, **kw):
    # sampler.batch_size 1: every sample is computed alone, so its floats do not depend on which rows Ray Data
    # bundles into a batch (the pool bounds change the blocks, hence the bundling; batched CPU kernels then differ
    # in the last bits, ~1e-7) and runs with other pools can be compared bit for bit
    base = dict(model=str(model_dir), prompt_limit=6, samples_per_prompt=3, batch_size=8, group_size=3,
                sampler={"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 1})
    return GenerationConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def generated(tiny_toy_model_dir, tmp_path_factory):
    """``get(strategy)``: (manifest, output folder) of ``small(strategy=strategy)``, generated once for the module;
    the tests that share an output only read it or rerun a config of the same pairs into it (a no-op they check)."""
    done = {}

    def get(strategy: str):
        if strategy not in done:
            out = tmp_path_factory.mktemp(f"generated_{strategy}") / "out"
            done[strategy] = (generate(small(tiny_toy_model_dir, strategy=strategy), out), out)
        return done[strategy]

    return get


# On-policy (both pools in use) with pools that may grow from one to two actors each and a 1 MiB object-store
# budget (smaller than a batch's outputs: Ray Data must still make progress): not part of the dataset's identity.
POOLS = dict(generation_pool={"min_size": 1, "max_size": 2}, reward_pool={"min_size": 1, "max_size": 2},
             object_store_mb=1)


@pytest.fixture(scope="module")
def rescaled(tiny_toy_model_dir, tmp_path_factory):
    """(manifest, output folder) of the shared on-policy config run again in a fresh folder with ``POOLS``: the
    rerun-determinism and the pools tests share this one run (a generation costs 25–45 s on 2 CPUs)."""
    out = tmp_path_factory.mktemp("rescaled") / "out"
    return generate(small(tiny_toy_model_dir, strategy="onpolicy", **POOLS), out), out


@pytest.mark.parametrize("strategy", ["onpolicy", "ddspo-paired", "rand-positive", "not-paired"])
def test_every_strategy_writes_valid_pairs(strategy, generated):
    manifest, out = generated(strategy)
    table = read_pairs(out / "pairs")
    rows = table.to_pylist()
    assert manifest["num_pairs"] == table.num_rows > 0 and not manifest["skipped"]
    assert {r["strategy"] for r in rows} == {strategy}
    assert latents_of(table, "latent_w").shape == (table.num_rows, 3, 32, 32)
    assert all(r["png_w"][:8] == b"\x89PNG\r\n\x1a\n" for r in rows)
    prompts = {s.text for s in train_specs()[:6]}
    assert {r["prompt"] for r in rows} <= prompts
    if strategy == "onpolicy":
        assert all(r["reward_w"] > r["reward_l"] and r["prompt_num_samples"] == 3 for r in rows)
        assert table.num_rows <= 6
    elif strategy == "ddspo-paired":
        assert table.num_rows == 6
        assert all(r["seed_w"] == r["seed_l"] and r["perturbed_prompt"] != r["prompt"] for r in rows)
        assert all(set(r["perturbed_prompt"].split()) < set(r["prompt"].split()) for r in rows)
    elif strategy == "rand-positive":
        assert table.num_rows == 6
        assert all(r["perturbed_prompt"] in prompts and r["perturbed_prompt"] != r["prompt"] for r in rows)
        assert all(r["seed_w"] != r["seed_l"] for r in rows)  # the loser image is another prompt's winner
    else:
        assert all(set(r["perturbed_prompt"].split()) < set(r["prompt"].split()) for r in rows)


def test_rerun_is_idempotent_and_deterministic(tiny_toy_model_dir, generated, rescaled):
    cfg = small(tiny_toy_model_dir, strategy="onpolicy")
    first, a = generated("onpolicy")  # a finished run of this config (shared with the strategy test)
    assert not first["skipped"]
    files = {p.name: p.read_bytes() for p in (a / "pairs").iterdir()}
    again = generate(cfg, a)
    assert again["skipped"] and {p.name: p.read_bytes() for p in (a / "pairs").iterdir()} == files
    other, b = rescaled  # a fresh run elsewhere (with other pools: the next test) reproduces the same pairs
    ta, tb = read_pairs(a / "pairs"), read_pairs(b / "pairs")
    assert ta.column("pair_id").to_pylist() == tb.column("pair_id").to_pylist()
    assert np.array_equal(latents_of(ta, "latent_w"), latents_of(tb, "latent_w"))
    assert not other["skipped"] and first["num_pairs"] == other["num_pairs"]
    with pytest.raises(FileExistsError, match="another config"):
        generate(small(tiny_toy_model_dir, seed=1), a)
    assert {p.name: p.read_bytes() for p in (a / "pairs").iterdir()} == files  # refused: left as it was


def test_autoscaling_pools_and_a_budget_make_the_same_pairs(tiny_toy_model_dir, generated, rescaled, tmp_path):
    """On-policy (both pools in use): fixed pools of one actor each, and pools that may grow to two actors each under
    a 1 MiB object-store budget, write the same pairs bit for bit; each config finds the other's dataset as its own,
    and so does a dataset recorded when ``num_actors`` was part of the identity."""
    fixed, a = generated("onpolicy")
    scaled, b = rescaled
    assert fixed["num_pairs"] == scaled["num_pairs"] > 0 and fixed["fingerprint"] == scaled["fingerprint"]
    assert scaled["config"]["generation_pool"] == {"min_size": 1, "max_size": 2} and scaled["config"]["object_store_mb"] == 1
    ta, tb = read_pairs(a / "pairs"), read_pairs(b / "pairs")
    assert ta.column("pair_id").to_pylist() == tb.column("pair_id").to_pylist()
    for column in ("reward_w", "reward_l", "seed_w", "seed_l", "png_w", "png_l"):
        assert ta.column(column).to_pylist() == tb.column(column).to_pylist(), column
    for column in ("latent_w", "latent_l"):
        assert np.array_equal(latents_of(ta, column), latents_of(tb, column)), column
    config = small(tiny_toy_model_dir, strategy="onpolicy")
    assert generate(small(tiny_toy_model_dir, strategy="onpolicy", **POOLS), a)["skipped"]  # reused, not refused
    assert generate(config, b)["skipped"]

    # a dataset made when num_actors was part of the identity (no pool fields): its recorded config still matches
    legacy = tmp_path / "legacy"
    shutil.copytree(a, legacy)  # the shared output stays as it was
    manifest = json.loads((legacy / MANIFEST).read_text())
    for name in ("generation_pool", "reward_pool", "object_store_mb"):
        del manifest["config"][name]
    manifest.update(fingerprint="0123456789abcdef", config={**manifest["config"], "num_actors": 2})
    (legacy / MANIFEST).write_text(json.dumps(manifest))
    assert generate(config, legacy)["skipped"]
    with pytest.raises(FileExistsError, match="samples_per_prompt"):
        generate(small(tiny_toy_model_dir, strategy="onpolicy", samples_per_prompt=4), legacy)


def test_onpolicy_rollouts_stream_without_a_shuffle(tiny_toy_model_dir):
    """A prompt's K rollouts travel in one row from their seeds to their pairs, so nothing gathers the run's rollouts:
    the on-policy plan holds no all-to-all operator (a groupby's sort, a sort, a repartition), which would keep every
    rollout of the run in the object store at once (bench/results/rollouts.md measures the peak). The
    loser-borrowing strategies still group their prompts, and the check sees that."""
    from ray.data._internal.logical.operators.all_to_all_operator import AbstractAllToAll

    from pipeline.data.generate import build_dataset

    def all_to_all(strategy):
        found, stack = [], [build_dataset(small(tiny_toy_model_dir, strategy=strategy))._logical_plan.dag]
        while stack:
            op = stack.pop()
            found += [op.name] if isinstance(op, AbstractAllToAll) else []
            stack += op.input_dependencies
        return found

    assert all_to_all("onpolicy") == [] and all_to_all("ddspo-paired") == []
    assert all_to_all("rand-positive")


def test_a_crash_leaves_nothing_a_rerun_would_trust(tiny_toy_model_dir, tmp_path):
    with pytest.raises(Exception, match="unknown reward"):
        generate(small(tiny_toy_model_dir, reward={"name": "no-such-reward"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_inputs_fail_clearly(tiny_toy_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        generate(small(tiny_toy_model_dir, prompts=str(tmp_path / "missing.txt")), tmp_path / "o1")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="contains no prompts"):
        generate(small(tiny_toy_model_dir, prompts=str(tmp_path / "empty.txt")), tmp_path / "o2")
    with pytest.raises(ValueError, match="strategy='best-of-n': expected one of"):
        small(tiny_toy_model_dir, strategy="best-of-n")


def test_job_cli(tiny_toy_model_dir, tmp_path, capsys):
    out = tmp_path / "job"
    args = ["--out", str(out), "--set", f"model={tiny_toy_model_dir}", "strategy=ddspo-paired", "prompt_limit=4",
            "sampler.num_steps=2", "batch_size=8"]
    assert generate_pairs.main(args) == 0
    assert "4 pairs from 4 prompts" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["config"]["prompt_limit"] == 4
    assert generate_pairs.main(args) == 0 and "already complete" in capsys.readouterr().out
