"""cluster.yaml validates against the schema shipped inside the installed ray package."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_validates_against_ray_schema(config):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=str)
    if errors:
        pytest.fail("cluster.yaml does not match ray-schema.json:\n" + "\n".join(
            f"at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in errors))


def test_ray_accepts_it_after_filling_defaults(config):
    # What `ray up` does before launching: merge the provider defaults, then validate.
    validate_config(prepare_config(config))


def test_gpu_group_scales_from_zero(config):
    node_types = config["available_node_types"]
    gpu = [t for t in node_types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, f"no node type with GPU resources in {sorted(node_types)}"
    assert all(t["min_workers"] == 0 for t in gpu)
    assert any(t["max_workers"] >= 1 for t in gpu)
    head = node_types[config["head_node_type"]]
    assert "GPU" not in head["resources"], "the head node should be a CPU node"
    assert any(name != config["head_node_type"] and "GPU" not in t["resources"]
               for name, t in node_types.items()), "no CPU worker type for quantizers"


def test_setup_installs_torch_before_the_project(config):
    commands = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(commands) if "pip install" in c and " ." in c)
    assert torch_at < project_at
