"""Generation's actor pools (autoscaling bounds) and object-store budget: checked with dotted-path errors and
outside the dataset's identity, without Ray. That they do not change the pairs is checked on a real generation in
tests/test_data_generate.py::test_autoscaling_pools_and_a_budget_make_the_same_pairs (it shares that module's
on-policy run); bench/rollouts.py measures what they do at scale."""

import pytest

from pipeline.config import ConfigError, build
from pipeline.data.generate import GenerationConfig, PoolConfig


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
