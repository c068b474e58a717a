"""The batched engine: K models trained together with stacked weights match one-at-a-time training."""
import copy

import numpy as np
import pytest
import torch

from farm.train.engine import Engine
from farm.run import prepare_run, run_local
from farm.spec import SpecError, spec_from_dict
from farm.store import RunStore
from tests.conftest import TINY_SPEC


def _spec(**resources):
    d = copy.deepcopy(TINY_SPEC)
    d["counts"] = {"original": 1, "retrain": 2, "shadow": 4}
    d["unlearn"] = []
    d["training"]["augment"] = True  # per-model augmentation draws must follow each model's own generator
    d["resources"] = resources
    return spec_from_dict(d)


def test_stacked_training_matches_one_at_a_time(tmp_path):
    torch.set_num_threads(1)
    spec = _spec()
    single_prep = prepare_run(spec, str(tmp_path / "single"))
    batch_prep = prepare_run(spec, str(tmp_path / "batched"))
    single = Engine(single_prep.context(), threads=1)
    batched = Engine(batch_prep.context(), threads=1)
    jobs = [j for j in single_prep.plan.jobs if j.role == "shadow"]  # different halves, odd split sizes
    for job in jobs:
        single.run(job)
    markers = batched.run_batch(jobs)
    assert [m["batched"] for m in markers] == [len(jobs)] * len(jobs)
    a, b = RunStore(str(tmp_path / "single")).read_conf(), RunStore(str(tmp_path / "batched")).read_conf()
    assert a.model_ids == b.model_ids
    # the same initialisation, batches and augmentations: equal up to float rounding of the kernels
    assert np.allclose(a.conf, b.conf, atol=2e-3, rtol=1e-3)
    assert np.array_equal(a.trained_on, b.trained_on)
    for ma, mb in zip(a.markers, b.markers):
        assert ma["accuracy"] == pytest.approx(mb["accuracy"], abs=0.01)


def test_batched_run_through_the_runner(tmp_path):
    spec = _spec(batch_models=3)
    result = run_local(prepare_run(spec, str(tmp_path)), progress=False)
    assert not result.failed and len(result.trained) == 7
    markers = RunStore(str(tmp_path)).markers()
    assert sorted(m["batched"] for m in markers.values()) == [1, 3, 3, 3, 3, 3, 3]


def test_batch_models_is_validated():
    with pytest.raises(SpecError, match="resources.batch_models must be a positive integer or 'auto'"):
        _spec(batch_models=0)
    assert _spec(batch_models="auto").resources.batch_models == "auto"


@pytest.mark.parametrize("layout", ["bmm", "grouped", "vmap", "triton"])
@pytest.mark.parametrize("size,channels", [(28, 1), (8, 1), (32, 3), (7, 1)])  # 7: odd maps, unfused
def test_stacked_layouts_match_each_model(layout, size, channels):
    """Every layout of the stacked forward (and its gradient) equals each model run on its own."""
    from farm.train.stacked import StackedModels
    from farm.train.models import build_model
    from farm.spec import ModelSpec

    torch.manual_seed(0)
    models = [build_model(ModelSpec(width=4), channels, 10, size) for _ in range(3)]
    stack = StackedModels(models)
    stack.layout = layout
    x = torch.randn(3, 5, channels, size, size)
    own = torch.stack([m(x[i]) for i, m in enumerate(models)])
    shared = torch.stack([m(x[0]) for m in models])
    assert torch.allclose(stack.forward(x), own, atol=1e-5)
    assert torch.allclose(stack.forward_shared(x[0]), shared, atol=1e-5)
    stack.forward(x).square().sum().backward()
    own.square().sum().backward()
    for name, p in stack.params.items():
        expected = torch.stack([dict(m.named_parameters())[name].grad for m in models])
        assert torch.allclose(p.grad, expected, atol=1e-4, rtol=1e-4), name


def test_default_layout_follows_the_device_and_kernel_choice(monkeypatch):
    from farm.train import stacked as batched

    assert batched.default_layout("cpu") == "grouped"
    for measured in (True, False):  # an H100-class GPU with Triton, or another GPU
        monkeypatch.setattr(batched, "triton_kernels_measured", lambda: measured)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
        assert batched.default_layout("cuda") == ("triton" if measured else "grouped")
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        assert batched.default_layout("cuda") == ("triton" if measured else "bmm")
    monkeypatch.setattr(batched, "LAYOUT", "vmap")  # forced (a benchmark's --layout)
    assert batched.default_layout("cpu") == batched.default_layout("cuda") == "vmap"


def test_prediction_paths_and_chunks_give_the_same_logits(monkeypatch):
    """The stacked forward pass in any chunking (the GPU path), the models one by one (the CPU path) and
    the CPU's pixel-bounded chunks all give the same logits."""
    from farm.train import loops as training
    from farm.train import stacked as batched
    from farm.train.models import build_model
    from farm.spec import ModelSpec

    torch.manual_seed(1)
    models = [build_model(ModelSpec(width=4), 1, 10, 8) for _ in range(3)]
    stack = batched.StackedModels(models)
    images = torch.randn(50, 1, 8, 8)
    queries = ("plain", "hflip")
    one_by_one = np.stack([training.predict_logits(m, images, queries, 1000) for m in models])
    assert one_by_one.shape == (3, 50, 2, 10)
    np.testing.assert_allclose(batched.predict_stacked(stack, images, queries, 1000), one_by_one, rtol=1e-5, atol=1e-6)
    for chunk in (1000, 7):  # one chunk; chunks of 7, the last one short
        got = batched.predict_stacked_chunks(stack, images, queries, chunk)
        np.testing.assert_allclose(got, one_by_one, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(training, "CPU_CHUNK_PIXELS", 64 * 6)  # 6 images of 8x8 a chunk
    small = np.stack([training.predict_logits(m, images, queries, 1000) for m in models])
    np.testing.assert_allclose(small, one_by_one, rtol=1e-5, atol=1e-6)
    stack.layout = "triton"  # the GPU's Triton kernels (here through Triton's interpreter), chunks of 7
    np.testing.assert_allclose(batched.predict_stacked_chunks(stack, images, queries, 7), one_by_one,
                               rtol=1e-5, atol=1e-5)


def test_triton_layout_trains_like_grouped_convolutions():
    """train_stacked (padding, masking, SGD, cosine schedule) through the Triton kernels ends where the
    grouped-convolution layout does, up to float rounding."""
    from farm.train import stacked as batched
    from farm.train.models import build_model
    from farm.spec import ModelSpec, TrainingSpec

    gen = torch.Generator().manual_seed(4)
    images = torch.randn(40, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (40,), generator=gen)
    train_sets = [np.arange(0, 40, 2), np.arange(1, 35, 2)]  # different sizes: the shorter one is padded
    cfg = TrainingSpec(epochs=2, batch_size=8, lr=0.05)
    final = {}
    for layout in ("grouped", "triton"):
        torch.manual_seed(5)
        stack = batched.StackedModels([build_model(ModelSpec(width=4), 1, 10, 8) for _ in range(2)])
        stack.layout = layout
        initial = {name: p.detach().clone() for name, p in stack.params.items()}
        batched.train_stacked(stack, images, labels, train_sets, cfg,
                              [torch.Generator().manual_seed(s) for s in (6, 7)])
        final[layout] = {name: p.detach().clone() for name, p in stack.params.items()}
    for name, p in final["grouped"].items():
        assert not torch.allclose(p, initial[name], atol=1e-3)  # the 6 SGD steps moved every tensor
        torch.testing.assert_close(final["triton"][name], p, atol=1e-4, rtol=1e-4)


def test_bf16_precision_trains_comparable_models(tmp_path):
    """training.precision bf16 (autocast; float32 weights) gives finite logits and the accuracy of fp32."""
    results = {}
    for precision in ("fp32", "bf16"):
        d = copy.deepcopy(TINY_SPEC)
        d["counts"] = {"shadow": 2}
        d["unlearn"] = []
        d["model"]["width"] = 8
        d["training"].update(precision=precision, epochs=8, batch_size=64)
        prep = prepare_run(spec_from_dict(d), str(tmp_path / precision))
        markers = Engine(prep.context(), threads=1).run_batch(prep.pending)
        results[precision] = np.mean([m["accuracy"]["test"] for m in markers])
    assert results["fp32"] > 0.8
    assert abs(results["bf16"] - results["fp32"]) < 0.1, results
