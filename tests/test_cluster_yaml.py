"""cluster.yaml against docs/cluster.md and the engine's kernel choice: the default GPU workers are H100/H200
nodes (where the stacked CNN gets farm.train.stacked_triton's kernels), the A10G node type is there, off and
documented, and the table "which kernels each node type gets" says what farm.train.stacked.default_layout
picks on each node's GPU."""
from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch
import yaml

from farm.train import stacked
from tests.conftest import REPO

# AWS instance type -> (GPU, GPUs per node, vCPUs); GPU -> CUDA compute capability
INSTANCES = {"p5.48xlarge": ("H100", 8, 192), "p5e.48xlarge": ("H200", 8, 192), "p5en.48xlarge": ("H200", 8, 192),
             "g5.xlarge": ("A10G", 1, 4)}
CAPABILITY = {"H100": (9, 0), "H200": (9, 0), "A10G": (8, 6)}
FAST = {"H100", "H200"}


def load_cluster() -> dict:
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def kernel_table() -> list[list[str]]:
    """The rows of docs/cluster.md's table of node types and their kernels, as lists of cells."""
    with open(os.path.join(REPO, "docs", "cluster.md")) as f:
        text = f.read()
    start = text.index("| node type in `cluster.yaml`")
    rows = []
    for line in text[start:].splitlines()[2:]:  # past the header and its rule
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_cluster_yaml_defaults_to_h100_h200_workers_and_keeps_the_a10g_off():
    cfg = load_cluster()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # the head trains nothing
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    for name, t in workers.items():
        instance = t["node_config"]["InstanceType"]
        assert instance in INSTANCES, f"{name}: unknown instance type {instance}"
        gpu, gpus, cpus = INSTANCES[instance]
        # stated so that Ray's autoscaler schedules by the node's real size
        assert t["resources"] == {"CPU": cpus, "GPU": gpus}, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    launchable = {name: INSTANCES[t["node_config"]["InstanceType"]][0] for name, t in workers.items()
                  if t["max_workers"] > 0}
    assert launchable and set(launchable.values()) <= FAST, launchable  # only H100/H200 nodes by default
    a10g = [name for name, t in workers.items() if t["node_config"]["InstanceType"] == "g5.xlarge"]
    assert a10g and all(workers[name]["max_workers"] == 0 for name in a10g)
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        header = f.read()
    assert all(name in header.split("cluster_name:")[0] for name in a10g)  # the switch is documented up top


def test_docs_table_names_every_gpu_node_type_and_the_kernels_the_engine_picks(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the engine picks the Triton kernels only where Triton is installed")
    types = load_cluster()["available_node_types"]
    rows = kernel_table()
    assert len(rows) >= 2
    documented = set()
    monkeypatch.setattr(stacked, "LAYOUT", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for node_types, instances, gpu_cell, autotuned, deterministic, _why in rows:
        names = re.findall(r"`([\w.]+)`", node_types)
        assert names and all(name in types for name in names), node_types
        documented |= set(names)
        for instance in re.findall(r"`([\w.]+)`", instances):
            gpu = INSTANCES[instance][0]
            major, minor = CAPABILITY[gpu]
            assert f"{gpu}" in gpu_cell and f"({major}.{minor})" in gpu_cell, (instance, gpu_cell)
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=(major, minor): c)
            for benchmark, cell in ((True, autotuned), (False, deterministic)):
                monkeypatch.setattr(torch.backends.cudnn, "benchmark", benchmark)
                assert re.findall(r"`(\w+)`", cell) == [stacked.default_layout("cuda")], (instance, cell)
    gpu_types = {name for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types <= documented, gpu_types - documented


def test_cluster_yaml_passes_the_ray_cluster_launchers_schema():
    """What `ray up` checks before it launches anything (Ray's private helpers: skipped where they moved).
    Every node type states its resources, so the check needs no AWS call to fill them in."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("this Ray has no ray.autoscaler._private.util.prepare_config / validate_config")
    validate_config(prepare_config(load_cluster()))
