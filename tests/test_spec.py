import copy

import pytest

from farm.spec import SpecError, load_spec, preset_names, spec_from_dict
from tests.conftest import TINY_SPEC


def test_presets_load():
    assert {"digits-demo", "fashion-mnist", "cifar10-resnet18"} <= set(preset_names())
    for name in preset_names():
        spec = load_spec(name)
        assert spec.name == name
        assert spec.queries[0] == "plain"


def test_identity_ignores_counts_and_methods_but_not_training():
    a = spec_from_dict(TINY_SPEC)
    more = copy.deepcopy(TINY_SPEC)
    more["counts"]["retrain"] = 10
    more["unlearn"].append({"method": "finetune", "count": 1, "hparams": {"lr": 0.1}})
    assert spec_from_dict(more).identity_hash() == a.identity_hash()
    other = copy.deepcopy(TINY_SPEC)
    other["training"]["epochs"] = 3
    assert spec_from_dict(other).identity_hash() != a.identity_hash()
    # precision changes the models; the GPU kernel choice only their last bits, like the other resources
    bf16 = copy.deepcopy(TINY_SPEC)
    bf16["training"]["precision"] = "bf16"
    assert spec_from_dict(bf16).identity_hash() != a.identity_hash()
    kernels = copy.deepcopy(TINY_SPEC)
    kernels["resources"] = {"gpu_kernels": "autotuned", "memory_format": "channels_last", "compile": True}
    assert spec_from_dict(kernels).identity_hash() == a.identity_hash()


def _with(path, value):
    d = copy.deepcopy(TINY_SPEC)
    *parents, last = path
    node = d
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return d


@pytest.mark.parametrize("path,value,needle", [
    (("dataset", "name"), "mnist-x", "dataset.name 'mnist-x' is unknown"),
    (("counts", "retrain"), -1, "counts.retrain must be a positive integer"),
    (("counts", "retrain"), 0, "counts.retrain must be a positive integer"),
    (("counts", "shadow"), 3, "counts.shadow must be even"),
    (("counts", "teacher"), 2, "counts.teacher is not a role"),
    (("forget", "fraction"), 0.0, "forget.fraction must lie in (0, 1)"),
    (("forget", "fraction"), 1.5, "forget.fraction must lie in (0, 1)"),
    (("training", "epochs"), 0, "training.epochs must be a positive integer"),
    (("training", "lr"), "fast", "training.lr must be a number"),
    (("model", "arch"), "vit", "model.arch 'vit' is unknown"),
    (("queries",), ["hflip"], "queries must start with 'plain'"),
    (("queries",), ["plain", "rotate"], "query 'rotate' is unknown"),
    (("resources", "cpus"), 0, "resources.cpus must be positive"),
    (("training", "momentum_x"), 1, "training: unknown field(s) momentum_x"),
    (("training", "precision"), "fp16", "training.precision 'fp16' is unknown; allowed: fp32, bf16, auto"),
    (("resources", "gpu_kernels"), "fast", "resources.gpu_kernels 'fast' is unknown"),
    (("resources", "memory_format"), "nhwc", "resources.memory_format 'nhwc' is unknown; allowed: contiguous, "
                                             "channels_last"),
    (("resources", "compile"), "max", "resources.compile must be true or false, got 'max'"),
])
def test_bad_values_name_the_field(path, value, needle):
    with pytest.raises(SpecError) as err:
        spec_from_dict(_with(path, value))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unlearn_count_and_unknown_preset():
    d = copy.deepcopy(TINY_SPEC)
    d["unlearn"][0]["count"] = 0
    with pytest.raises(SpecError, match=r"unlearn\[0\].count must be a positive integer"):
        spec_from_dict(d)
    with pytest.raises(SpecError, match="unknown preset 'nope'; presets: .*digits-demo"):
        load_spec("nope")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("missing/spec.yaml")


def test_to_dict_round_trips():
    """spec_from_dict(spec.to_dict()) gives the same spec, methods included (scripts edit specs that way)."""
    spec = spec_from_dict(TINY_SPEC)
    assert spec.unlearn
    assert spec_from_dict(spec.to_dict()) == spec
