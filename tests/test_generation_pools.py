"""Generation's actor pools (autoscaling bounds) and object-store budget: checked with dotted-path errors, outside
the dataset's identity, and without effect on the pairs (bench/rollouts.py measures what they do at scale)."""

import json

import numpy as np
import pytest
import ray

from pipeline.config import ConfigError, build
from pipeline.data.generate import GenerationConfig, PoolConfig, generate
from pipeline.data.schema import MANIFEST, latents_of, read_pairs


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("fields, message", [
    ({"generation_pool": {"min_size": 0}}, "generation_pool.min_size=0: expected >= 1"),
    ({"generation_pool": {"min_size": 3, "max_size": 2}}, r"generation_pool.max_size=2: expected >= min_size \(3\)"),
    ({"reward_pool": {"max_size": 0}}, r"reward_pool.max_size=0: expected >= min_size \(1\)"),
    ({"reward_pool": "wide"}, "reward_pool='wide': expected a mapping of PoolConfig fields"),
    ({"object_store_mb": -1}, "object_store_mb=-1: expected >= 0"),
])
def test_pool_fields_are_checked_with_dotted_paths(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**fields)
    with pytest.raises(ConfigError, match=f"generation.{message}"):  # nested, as in the round job's config
        build(GenerationConfig, fields, "generation")


def test_pools_and_budget_are_not_the_dataset_identity():
    base = GenerationConfig()
    assert base.generation_bounds == PoolConfig(1, 1) and GenerationConfig(num_actors=3).generation_bounds == PoolConfig(3, 3)
    resized = GenerationConfig(num_actors=2, generation_pool={"min_size": 1, "max_size": 4},
                               reward_pool={"max_size": 2}, object_store_mb=64)
    assert resized.generation_bounds == PoolConfig(1, 4) and resized.reward_pool == PoolConfig(1, 2)
    assert resized.fingerprint() == base.fingerprint() != GenerationConfig(samples_per_prompt=3).fingerprint()
    strategy = resized.generation_bounds.strategy(initial=resized.num_actors)  # num_actors: the actors started
    assert (strategy.min_size, strategy.max_size, strategy.initial_size) == (1, 4, 2)
    assert PoolConfig(4, 8).strategy(initial=1).initial_size == 4  # clamped into the bounds


def test_autoscaling_pools_and_a_budget_make_the_same_pairs(tiny_toy_model_dir, tmp_path):
    """On-policy (both pools in use): a fixed pool of one actor each, and pools that may grow to two actors each
    under a 1 MiB object-store budget (smaller than a batch's outputs: Ray Data still makes progress), write the
    same pairs; the resized config finds the first dataset as its own."""
    def config(**kw):
        return GenerationConfig(model=str(tiny_toy_model_dir), prompt_limit=6, samples_per_prompt=2, batch_size=4,
                                sampler={"num_steps": 2, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 4}, **kw)

    fixed = generate(config(), tmp_path / "fixed")
    scaled_cfg = config(generation_pool={"min_size": 1, "max_size": 2}, reward_pool={"min_size": 1, "max_size": 2},
                        object_store_mb=1)
    scaled = generate(scaled_cfg, tmp_path / "scaled")
    a, b = read_pairs(tmp_path / "fixed" / "pairs"), read_pairs(tmp_path / "scaled" / "pairs")
    assert fixed["num_pairs"] == scaled["num_pairs"] > 0 and fixed["fingerprint"] == scaled["fingerprint"]
    assert a.column("pair_id").to_pylist() == b.column("pair_id").to_pylist()
    for column in ("reward_w", "reward_l", "seed_w", "seed_l"):
        assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    assert np.array_equal(latents_of(a, "latent_w"), latents_of(b, "latent_w"))
    assert generate(scaled_cfg, tmp_path / "fixed")["skipped"]  # same pairs: the finished dataset is reused

    # a dataset made when num_actors was part of the identity: its recorded config still matches
    path = tmp_path / "fixed" / MANIFEST
    manifest = json.loads(path.read_text())
    for name in ("generation_pool", "reward_pool", "object_store_mb"):
        del manifest["config"][name]
    manifest.update(fingerprint="0123456789abcdef", config={**manifest["config"], "num_actors": 2})
    path.write_text(json.dumps(manifest))
    assert generate(config(), tmp_path / "fixed")["skipped"]
    with pytest.raises(FileExistsError, match="samples_per_prompt"):
        generate(config().__class__(**{**config().__dict__, "samples_per_prompt": 3}), tmp_path / "fixed")
