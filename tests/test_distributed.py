"""One model data-parallel across Ray Train workers (TorchTrainer + DDP on CPU workers, gloo)."""
import copy

import numpy as np
import pytest

from farm.run.data_parallel import run_distributed
from farm.run import prepare_run, run_local
from farm.spec import spec_from_dict
from farm.store import RunStore
from tests.conftest import TINY_SPEC


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_data_parallel_models_match_single_worker_training(ray_address, tmp_path, compile_):
    """Also with resources.compile: DDP over the compiled model, against one uncompiled worker."""
    d = copy.deepcopy(TINY_SPEC)
    d["counts"] = {"original": 1}
    d["resources"] = {"workers_per_model": 2, "compile": compile_}
    spec = spec_from_dict(d)
    result = run_distributed(prepare_run(spec, str(tmp_path / "ddp")), 2, use_gpu=False, progress=False)
    assert not result.failed and result.trained == ["original-00000"]  # the 2 unlearned are left pending
    ddp = RunStore(str(tmp_path / "ddp"))
    markers = ddp.markers()
    assert sorted(markers) == ["original-00000"]
    assert all(m["data_parallel_workers"] == 2 for m in markers.values())
    assert ddp.exists("weights/original-00000.pt")
    single_spec = spec_from_dict({**d, "resources": {}})
    run_local(prepare_run(single_spec, str(tmp_path / "one")), progress=False)
    one = RunStore(str(tmp_path / "one")).read_conf(sorted(markers))
    two = ddp.read_conf()
    # the same global batches and initialisation: equal up to the float order of the gradient all-reduce
    assert np.allclose(one.conf, two.conf, atol=1e-2, rtol=1e-2)
    assert np.array_equal(one.trained_on, two.trained_on)
