"""farm.train.stacked_resnet: K models with BatchNorm stacked into one network equal the K models run one at a
time (forward, gradients, running statistics after SGD steps, eval predictions, unstacking)."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from farm.run import prepare_run
from farm.spec import ModelSpec, spec_from_dict
from farm.store import RunStore
from farm.train.engine import Engine
from farm.train.loops import predict_logits
from farm.train.models import build_model
from farm.train.stacked import StackedModels, predict_stacked_chunks
from farm.train.stacked_resnet import StackedNet, stack_models, unstack
from tests.conftest import TINY_SPEC

K, B, N_CLASSES = 3, 4, 3
TOL = dict(rtol=1e-9, atol=1e-10)  # float64: differences are the kernels' summation order only
pytestmark = pytest.mark.usefixtures("one_thread")  # bit-comparable kernels



class TinyResNet(nn.Module):
    """The ResNet building blocks at toy size: stem conv-BN-ReLU-maxpool, a BasicBlock, a strided BasicBlock
    with a 1x1 conv-BN downsample, a grouped Bottleneck (groups=2), average pool, Flatten, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        down = nn.Sequential(conv1x1(4, 8, stride=2), nn.BatchNorm2d(8))
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 8, stride=2, downsample=down),
                                    Bottleneck(8, 2, groups=2, base_width=64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, N_CLASSES)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(self.layer1(x))))


def _tiny_models(k=K, seed=0):
    torch.manual_seed(seed)
    models = [TinyResNet().double() for _ in range(k)]
    with torch.no_grad():  # non-trivial statistics and BN affines, different per model
        for m in models:
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_()
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0, 0.1)
                    mod.num_batches_tracked.fill_(int(torch.randint(0, 5, ())))
    return models


def _batches(k, seed, size=8, shape=(3, 8, 8)):
    """Model i's own batch from its own seed-derived generator: x [K, B, *shape], y [K, B]."""
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(k)]
    x = torch.stack([torch.randn(size, *shape, generator=g, dtype=torch.float64) for g in gens])
    y = torch.stack([torch.randint(0, N_CLASSES, (size,), generator=g) for g in gens])
    return x, y


def _assert_states_equal(got: dict, want: dict, **tol):
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, **(tol or TOL), msg=name)


def test_train_forward_gradients_and_statistics_match_each_model():
    models = _tiny_models()
    stacked = stack_models(models)
    x, y = _batches(K, seed=1, size=B)
    out = stacked(x)
    own = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert out.shape == (K, B, N_CLASSES)
    torch.testing.assert_close(out, own, **TOL)
    F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(K, B).mean(1).sum().backward()
    sum(F.cross_entropy(own[i], y[i]) for i in range(len(models))).backward()  # each model's own graph
    grads = {n: p.grad for n, p in stacked.net.named_parameters()}
    for i, m in enumerate(models):
        for name, p in m.named_parameters():
            torch.testing.assert_close(grads[name].unflatten(0, (K, -1))[i], p.grad, **TOL, msg=name)
    # the running statistics after this one train-mode forward pass, and the per-model counts
    for i, m in enumerate(unstack(stacked)):
        _assert_states_equal(m.state_dict(), models[i].state_dict())


def test_sgd_steps_match_each_model_and_eval_predictions_agree():
    models = _tiny_models(seed=2)
    stacked = stack_models(models)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = torch.optim.SGD(stacked.parameters(), **sgd)
    opts = [torch.optim.SGD(m.parameters(), **sgd) for m in models]
    for step in range(3):
        x, y = _batches(K, seed=10 + step)
        loss = F.cross_entropy(stacked(x).flatten(0, 1), y.flatten(), reduction="none").view(K, -1).mean(1)
        opt.zero_grad()
        loss.sum().backward()  # each model's gradient is its own: the other terms do not depend on it
        opt.step()
        for i, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            o.step()
    for i, m in enumerate(unstack(stacked)):
        state = m.state_dict()
        _assert_states_equal(state, models[i].state_dict())
        assert state["bn1.num_batches_tracked"] == before[i]["bn1.num_batches_tracked"] + 3
        assert not torch.allclose(state["layer1.1.bn2.running_var"], before[i]["layer1.1.bn2.running_var"])
    stacked.eval()
    for m in models:
        m.eval()
    x, _ = _batches(K, seed=20, size=5)
    torch.testing.assert_close(stacked(x), torch.stack([m(x[i]) for i, m in enumerate(models)]), **TOL)
    torch.testing.assert_close(stacked.forward_shared(x[0]), torch.stack([m(x[0]) for m in models]), **TOL)


def test_batchnorm_statistics_are_not_shared_across_models():
    """Replacing model 1's batch by one of another scale and offset changes model 1's outputs and running
    statistics only: with statistics shared across models, model 0's would change too."""
    models = _tiny_models(k=2, seed=3)
    x, _ = _batches(2, seed=4, size=B)
    odd = x.clone()
    odd[1] = 50 * torch.randn(odd[1].shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype) + 20
    a, b = stack_models(models), stack_models(models)
    out_a, out_b = a(x), b(odd)
    torch.testing.assert_close(out_b[0], out_a[0], **TOL)
    assert not torch.allclose(out_b[1], out_a[1], atol=1e-3)
    (ma0, ma1), (mb0, mb1) = unstack(a), unstack(b)
    _assert_states_equal(mb0.state_dict(), ma0.state_dict())
    assert not torch.allclose(mb1.bn1.running_mean, ma1.bn1.running_mean)


def test_farm_resnet18_stacks_trains_and_unstacks():
    """farm.train.models' ResNet-18 (3x3 stem, no max-pool) at 3x16x16, K=2: train-mode forward pass and
    gradients equal each model's; unstacked state_dicts equal the originals and load with strict=True."""
    torch.manual_seed(6)
    models = [build_model(ModelSpec(arch="resnet18"), 3, 10, 16) for _ in range(2)]
    stacked = stack_models(models)
    assert isinstance(stacked, StackedNet)
    for i, m in enumerate(unstack(stacked)):  # (e) before any step: exactly the originals
        assert type(m) is type(models[i])
        _assert_states_equal(m.state_dict(), models[i].state_dict(), rtol=0, atol=0)
        build_model(ModelSpec(arch="resnet18"), 3, 10, 16).load_state_dict(m.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, B, 3, 16, 16, generator=gen), torch.randint(0, 10, (2, B), generator=gen)
    out = stacked(x)
    own = torch.stack([m(x[i]) for i, m in enumerate(models)])
    torch.testing.assert_close(out, own, rtol=1e-4, atol=1e-5)
    F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(2, B).mean(1).sum().backward()
    sum(F.cross_entropy(own[i], y[i]) for i in range(len(models))).backward()  # each model's own graph
    grads = {n: p.grad for n, p in stacked.net.named_parameters()}
    for i, m in enumerate(models):
        for name, p in m.named_parameters():
            torch.testing.assert_close(grads[name].unflatten(0, (2, -1))[i], p.grad, rtol=1e-3, atol=1e-5,
                                       msg=name)
    for i, m in enumerate(unstack(stacked)):  # running statistics after the train-mode pass
        _assert_states_equal(m.state_dict(), models[i].state_dict(), rtol=1e-5, atol=1e-6)


def test_unstacked_modules_are_independent_copies_in_the_stacked_mode():
    models = _tiny_models(k=2)
    stacked = stack_models(models).eval()
    back = unstack(stacked)
    assert all(not m.training for m in back) and all(m.fc.weight.requires_grad for m in back)
    with torch.no_grad():
        back[0].fc.weight.zero_()
    assert not torch.equal(unstack(stacked)[0].fc.weight, back[0].fc.weight)  # no views of the stack
    assert stacked.state_dict().keys() >= {"net.conv1.weight", "net.bn1.count_offset", "net.fc.weight"}
    assert not any(p.is_meta for p in stacked.parameters())


def test_what_cannot_be_stacked_is_refused():
    with pytest.raises(TypeError, match="no rule for 1"):
        stack_models([nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)) for _ in range(2)])
    with pytest.raises(ValueError, match="differ"):
        stack_models([nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 4, 5))])
    cumulative = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)) for _ in range(2)]
    cumulative[1][1].num_batches_tracked += 1
    with pytest.raises(ValueError, match="momentum=None"):
        stack_models(cumulative)
    stacked = stack_models(_tiny_models(k=2))
    with pytest.raises(ValueError, match="expected inputs"):
        stacked(torch.zeros(3, 1, 3, 8, 8, dtype=torch.float64))


def test_the_engine_stacks_resnet18_jobs_of_one_training_set_size(tmp_path):
    """ResNet-18 jobs through the farm's engine (80 8x8 images, 1 epoch): one batch of shadows (half the train split)
    and retrained models (the train split less the forget set) is stacked as two batches of one training-set
    size each, and equals training one at a time.  One SGD step per model: ResNet-18 training from scratch
    amplifies float rounding (a 1e-7 relative change of the initial weights grows to 1e-2 in 3 steps at
    lr 0.05, one model alone), so longer runs agree only as models, not to a tolerance."""
    rng = np.random.default_rng(0)  # a small image set: ResNet-18 on the CPU takes seconds per 256 images
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 4, 80))
    raw = copy.deepcopy(TINY_SPEC)
    raw.update(model={"arch": "resnet18"}, counts={"retrain": 2, "shadow": 2}, unlearn=[], queries=["plain"],
               dataset={"name": "arrays", "path": str(tmp_path / "d.npz"), "test_fraction": 0.25})
    raw["training"].update(epochs=1, batch_size=4096)  # the whole training set: one step
    spec = spec_from_dict(raw)
    single, batched = prepare_run(spec, str(tmp_path / "single")), prepare_run(spec, str(tmp_path / "batched"))
    jobs = list(single.plan.jobs)
    assert len({len(j.train_idx) for j in jobs}) == 2
    one = Engine(single.context(), threads=1)
    for job in jobs:
        one.run(job)
    markers = Engine(batched.context(), threads=1).run_batch(jobs)
    assert [m["batched"] for m in markers] == [2, 2, 2, 2] and [m["role"] for m in markers] == [j.role for j in jobs]
    a, b = RunStore(str(tmp_path / "single")).read_conf(), RunStore(str(tmp_path / "batched")).read_conf()
    assert a.model_ids == b.model_ids
    assert np.allclose(a.conf, b.conf, atol=2e-3, rtol=1e-3)


def test_channels_last_gives_the_same_resnet18_models(tmp_path):
    """resources.memory_format: channels_last: the engine's models, stacked network and images lie in NHWC,
    and shadows, retrained models (stacked, one SGD step: see above) and stacked and lone finetunes equal
    the contiguous run's up to float rounding."""
    from farm.train.loops import is_channels_last

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 4, 80))
    raw = copy.deepcopy(TINY_SPEC)
    raw.update(model={"arch": "resnet18"}, counts={"original": 1, "shadow": 2}, queries=["plain"],
               unlearn=[{"method": "finetune", "count": 3, "hparams": {"lr": 0.01, "epochs": 1}}],
               dataset={"name": "arrays", "path": str(tmp_path / "d.npz"), "test_fraction": 0.25})
    raw["training"].update(epochs=1, batch_size=4096)
    conf, formats = {}, []
    for memory_format in ("contiguous", "channels_last"):
        raw["resources"] = {"memory_format": memory_format}
        prep = prepare_run(spec_from_dict(raw), str(tmp_path / memory_format))
        engine = Engine(prep.context(), threads=1)
        trained = [j for j in prep.plan.jobs if j.role != "unlearned"]
        unlearned = [j for j in prep.plan.jobs if j.role == "unlearned"]
        engine.run(trained[0])  # the original
        engine.run_batch(trained[1:])  # the two shadows, stacked
        engine.run_batch(unlearned[:2])  # two finetunes stacked by the twin, one alone
        engine.run(unlearned[2])
        stack = StackedModels([engine.new_model() for _ in range(2)])
        formats.append((is_channels_last(engine.new_model()), is_channels_last(stack.net),
                        engine.images.is_contiguous(memory_format=torch.channels_last)))
        store = RunStore(str(tmp_path / memory_format))
        weights = store.read_weights(trained[0].model_id, store.marker(trained[0].model_id))
        original = torch.load(io.BytesIO(weights), weights_only=True)
        assert all(w.is_contiguous() for w in original.values())  # the store's weights lie in plain strides
        table = store.read_conf()
        conf[memory_format] = table.conf[[table.model_ids.index(j.model_id) for j in prep.plan.jobs]]
    assert formats == [(False, False, False), (True, True, True)]
    np.testing.assert_allclose(conf["channels_last"], conf["contiguous"], atol=2e-3, rtol=1e-3)


def test_stacked_prediction_uses_running_statistics_as_each_model_does():
    """The GPU's prediction path (the stacked forward pass in chunks) runs in eval mode even right after
    training, and equals each unstacked model's prediction on the CPU path."""
    torch.manual_seed(0)
    models = [build_model(ModelSpec(arch="resnet18"), in_channels=1, n_classes=4, image_size=8) for _ in range(2)]
    for m in models:  # running statistics unlike a batch's, so train mode would give other logits
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    stack = StackedModels(models).train()
    images = torch.randn(6, 1, 8, 8)
    got = predict_stacked_chunks(stack, images, ("plain",), chunk=4)
    want = np.stack([predict_logits(m, images, ("plain",), 4) for m in stack.unstack()])
    assert np.allclose(got, want, atol=1e-4)
