"""farm.train.models: output shapes, parameter counts, no BatchNorm in small-cnn, seeded initialization."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from farm.train.models import build_model, count_parameters
from farm.spec import ModelSpec, SpecError


@pytest.mark.parametrize("in_channels,size", [(1, 8), (1, 28), (3, 32)])
def test_small_cnn_shapes(in_channels, size):
    model = build_model(ModelSpec(arch="small-cnn", width=16), in_channels, 10, size)
    out = model(torch.randn(5, in_channels, size, size))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()


def test_small_cnn_pools_only_while_large_enough():
    pools = lambda m: sum(isinstance(x, nn.MaxPool2d) for x in m.modules())  # noqa: E731
    assert pools(build_model(ModelSpec(width=4), 1, 10, 8)) == 2  # 8 -> 4 -> 2
    assert pools(build_model(ModelSpec(width=4), 1, 10, 4)) == 1  # 4 -> 2, then too small
    assert pools(build_model(ModelSpec(width=4), 1, 10, 2)) == 0
    assert build_model(ModelSpec(width=4), 1, 10, 2)(torch.randn(2, 1, 2, 2)).shape == (2, 10)


def test_small_cnn_has_no_batchnorm_and_no_buffers():
    model = build_model(ModelSpec(arch="small-cnn", width=32), 1, 10, 28)
    norm_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    assert not any(isinstance(m, norm_types) for m in model.modules())
    assert list(model.buffers()) == []
    assert count_parameters(model) == 320 + 18_496 + (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10)  # 0.42M


def test_small_cnn_works_under_vmap():
    model = build_model(ModelSpec(width=4), 1, 10, 8)
    params = {k: torch.stack([v, v + 0.01]) for k, v in model.named_parameters()}
    x = torch.randn(3, 1, 8, 8)
    out = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    assert out.shape == (2, 3, 10)
    torch.testing.assert_close(out[0], model(x))


def test_resnet18_cifar_shapes_and_stem():
    model = build_model(ModelSpec(arch="resnet18"), 3, 10, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert 11_000_000 < count_parameters(model) < 11_300_000


def test_resnet18_respects_in_channels():
    model = build_model(ModelSpec(arch="resnet18"), 1, 7, 28)
    assert model.conv1.in_channels == 1
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("arch,in_channels,size", [("small-cnn", 1, 28), ("resnet18", 3, 32)])
def test_same_seed_same_initial_parameters(arch, in_channels, size):
    def init(seed):
        torch.manual_seed(seed)
        return build_model(ModelSpec(arch=arch, width=8), in_channels, 10, size).state_dict()

    a, b, c = init(0), init(0), init(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_count_parameters_small_cnn_formula():
    w, c, k = 8, 3, 10
    flat = 2 * w * 8 * 8  # 32 -> 16 -> 8 after the two max-pools
    expected = (c * w * 9 + w) + (w * 2 * w * 9 + 2 * w) + (flat * 4 * w + 4 * w) + (4 * w * k + k)
    assert count_parameters(build_model(ModelSpec(width=w), c, k, 32)) == expected


def test_bad_arguments():
    with pytest.raises(SpecError, match="model.arch 'vit' is unknown"):
        build_model(ModelSpec(arch="vit"), 3, 10, 32)
    with pytest.raises(SpecError, match="model.width must be a positive integer"):
        build_model(ModelSpec(width=0), 3, 10, 32)
    with pytest.raises(ValueError, match="n_classes must be at least 2"):
        build_model(ModelSpec(), 3, 1, 32)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        build_model(ModelSpec(), 3, 10, 0)
