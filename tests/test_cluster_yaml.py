"""cluster.yaml is a real cluster-launcher config: it passes Ray's own schema validation, offline."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _validated(config: dict) -> dict:
    """What `ray up` does before touching a cloud: fill the provider's defaults, then validate the schema."""
    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation(config):
    full = _validated(config)
    types = full["available_node_types"]
    assert full["head_node_type"] in types
    gpu_types = [name for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types, "a GPU worker type"
    assert types[full["head_node_type"]].get("resources", {}).get("GPU", 0) == 0


def test_cluster_installs_this_project_on_every_node(config):
    mounted = {remote for remote, local in config["file_mounts"].items() if local == "."}
    assert mounted, "the repository is mounted on the nodes"
    setup = " && ".join(config["setup_commands"])
    assert any(f"pip install -q -e {remote}" in setup for remote in mounted)
    assert ".venv" in config["rsync_exclude"]


@pytest.mark.parametrize("breakage", ["typo_field", "bad_resource", "unknown_head"])
def test_validation_rejects_broken_configs(config, breakage):
    bad = copy.deepcopy(config)
    if breakage == "typo_field":
        bad["setup_comands"] = bad.pop("setup_commands")
    elif breakage == "bad_resource":
        bad["available_node_types"]["head"]["resources"]["CPU"] = "many"
    else:
        bad["head_node_type"] = "missing"
    with pytest.raises(Exception, match="setup_comands|many|head_node_type"):
        _validated(bad)
