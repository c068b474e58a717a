"""farm.train.stacked_triton's stacked 3x3 convolution against torch's conv2d, model by model (on a CPU through
Triton's interpreter, which tests/conftest.py turns on when there is no GPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO

stacked_triton = pytest.importorskip("farm.train.stacked_triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def full_precision_float32(monkeypatch):
    """On a GPU, float32 in full precision on both sides (tf32 would differ from torch's by ~1e-3)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def reference(x, w, b):
    """Each model's own conv2d (NCHW), back to [K, B, H, W, O]; x may hold one input shared by all."""
    return torch.stack([F.conv2d(x[min(k, len(x) - 1)].permute(0, 3, 1, 2), w[k], b[k], padding=1)
                        .permute(0, 2, 3, 1) for k in range(len(w))])


@pytest.mark.parametrize("k,n,h,w,c,o", [
    (2, 2, 6, 5, 1, 8),     # the first layer: one channel, (tap, channel) pairs gathered together
    (2, 3, 4, 4, 3, 16),    # RGB
    (3, 2, 7, 7, 32, 20),   # whole channel blocks per tap; O not a power of two
    (2, 1, 5, 5, 48, 72),   # C a multiple of 16 only; O over one 64-channel block
    (2, 2, 3, 9, 20, 16),   # C that fits no block: gathered pairs, several reduction tiles
    (1, 5, 8, 8, 16, 16),   # one model; M = 320 positions, three position tiles
])
def test_stacked_conv_and_gradients_match_conv2d(k, n, h, w, c, o):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(k, n, h, w, c, generator=gen).to(DEVICE).requires_grad_(True)
    wt = torch.randn(k, o, c, 3, 3, generator=gen).to(DEVICE).requires_grad_(True)
    b = torch.randn(k, o, generator=gen).to(DEVICE).requires_grad_(True)
    out = stacked_triton.stacked_conv3x3(x, wt, b)
    ref = reference(x, wt, b)
    assert out.shape == (k, n, h, w, o)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    for got, expected in zip(torch.autograd.grad(out, (x, wt, b), g), torch.autograd.grad(ref, (x, wt, b), g)):
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def reference_pooled(x, w, b):
    """conv -> ReLU -> 2x2 max-pool per model, as farm.train.models' SmallCNN runs it."""
    conv = reference(x, w, b)
    k, n = conv.shape[:2]
    pooled = F.max_pool2d(F.relu(conv).flatten(0, 1).permute(0, 3, 1, 2), 2)
    return pooled.permute(0, 2, 3, 1).reshape(k, n, *pooled.shape[2:], -1)


@pytest.mark.parametrize("k,n,h,w,c,o", [
    (2, 2, 6, 4, 1, 8),     # the first layer's one channel
    (2, 2, 8, 6, 32, 20),   # whole channel blocks; O not a power of two
    (2, 3, 6, 6, 48, 72),   # 108 positions, one partial tile; O over one block
    (3, 1, 4, 10, 20, 16),  # gathered (tap, channel) pairs
])
def test_fused_conv_relu_pool_and_gradients_match_torch(k, n, h, w, c, o):
    """pool=True equals conv2d, ReLU, max_pool2d(2) model by model, gradients included (the gradient reaches
    each window's winner, and nothing where the ReLU zeroed the window)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(k, n, h, w, c, generator=gen).to(DEVICE).requires_grad_(True)
    wt = torch.randn(k, o, c, 3, 3, generator=gen).to(DEVICE).requires_grad_(True)
    b = torch.randn(k, o, generator=gen).to(DEVICE).requires_grad_(True)
    out = stacked_triton.stacked_conv3x3(x, wt, b, pool=True)
    ref = reference_pooled(x, wt, b)
    assert out.shape == (k, n, h // 2, w // 2, o)
    assert (ref == 0).any() and (ref > 0).any()  # both sides of the ReLU are exercised
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    for got, expected in zip(torch.autograd.grad(out, (x, wt, b), g), torch.autograd.grad(ref, (x, wt, b), g)):
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def test_fused_pool_needs_an_even_feature_map():
    x, w, b = torch.zeros(1, 1, 5, 4, 1), torch.zeros(1, 4, 1, 3, 3), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="even height and width"):
        stacked_triton.stacked_conv3x3(x, w, b, pool=True)


def test_weight_gradient_summed_over_several_slices_is_deterministic(monkeypatch):
    """Positions split into slices (8 here) whose partial sums add up to the whole, the same bits twice; the
    bias's gradient is the last row (here in a reduction tile of its own: 16 channels fill whole tiles)."""
    monkeypatch.setattr(stacked_triton, "WGRAD_SLICE", 128)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, 16, generator=gen).to(DEVICE)
    g = torch.randn(2, 4, 16, 16, 16, generator=gen).to(DEVICE)
    got = stacked_triton._weight_grad(x, g)
    assert got.shape == (2, 9 * 16 + 1, 16)
    assert torch.equal(got, stacked_triton._weight_grad(x, g))
    # grad_w[k, (i*3 + j)*C + c, o] = sum over positions of in[k, b, y+i-1, x+j-1, c] * g[k, b, y, x, o]
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    expected = torch.stack([torch.einsum("kbyxc,kbyxo->kco", padded[:, :, i:i + 16, j:j + 16], g)
                            for i in range(3) for j in range(3)], dim=1).reshape(2, 9 * 16, 16)
    torch.testing.assert_close(got[:, :9 * 16], expected, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got[:, 9 * 16], g.sum(dim=(1, 2, 3)), atol=1e-3, rtol=1e-4)


def test_shared_input_is_read_by_every_model_and_has_no_gradient():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 5, 5, 1, generator=gen).to(DEVICE)
    wt = torch.randn(4, 8, 1, 3, 3, generator=gen).to(DEVICE).requires_grad_(True)
    b = torch.randn(4, 8, generator=gen).to(DEVICE)
    out = stacked_triton.stacked_conv3x3(x, wt, b, shared=True)
    torch.testing.assert_close(out, reference(x, wt, b), atol=1e-4, rtol=1e-4)
    pooled = stacked_triton.stacked_conv3x3(x[:, :, :4, :4], wt, b, shared=True, pool=True)
    torch.testing.assert_close(pooled, reference_pooled(x[:, :, :4, :4], wt, b), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="shared input"):
        out.sum().backward()


def test_weight_packing_orders():
    """Row (i*3 + j)*C + c of the packed weight is w[:, :, c, i, j]; the transposed one flips the taps."""
    w = torch.arange(2 * 4 * 3 * 9, dtype=torch.float32).view(2, 4, 3, 3, 3)
    packed = stacked_triton.pack_weight(w)
    flipped = stacked_triton.pack_weight_transposed(w)
    for i in range(3):
        for j in range(3):
            for c in range(3):
                assert torch.equal(packed[:, (i * 3 + j) * 3 + c, :], w[:, :, c, i, j])
            for o in range(4):
                assert torch.equal(flipped[:, (i * 3 + j) * 4 + o, :], w[:, o, :, 2 - i, 2 - j])


def test_kernels_compile_for_a_hopper_gpu(tmp_path):
    """Triton's real compiler and ptxas (in Triton's wheel) lower every launch of the presets' CNN (width 32)
    for sm_90 (H100/H200), specialised as a launch is: within its shared memory, and with the operands of
    the layers whose channels fill whole tiles loaded as vectors, asynchronously (an earlier version's
    input offset hid their alignment from the compiler, which then loaded them one element at a time):
    what the interpreter above cannot check."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    proc = subprocess.run([sys.executable, "scripts/check_triton_compile.py", "--width", "32", "--dtypes", "bf16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " s, shared memory " in line]
    assert len(lines) == 10  # bf16: 10 launches in the deterministic tile
    conv2 = [line for line in lines if line.split()[:4] == ["conv", "bf16", "C=32", "O=64"]]
    assert len(conv2) == 2 and all("loads: async x8 x8" in line for line in conv2), "\n".join(conv2)
    assert "all kernels compile for sm_90" in proc.stdout


def test_autotuned_launches_give_the_same_results(monkeypatch):
    """With GPU kernels autotuned (cudnn.benchmark) the launches go through Triton's autotuner (here over
    one tile, so nothing is timed) and give what the fixed tile gives."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 6, 6, 16, generator=gen).to(DEVICE).requires_grad_(True)
    wt = torch.randn(2, 32, 16, 3, 3, generator=gen).to(DEVICE).requires_grad_(True)
    b = torch.randn(2, 32, generator=gen).to(DEVICE).requires_grad_(True)

    def run():
        out = stacked_triton.stacked_conv3x3(x, wt, b, pool=True)
        return (out, *torch.autograd.grad(out, (x, wt, b), torch.ones_like(out)))

    fixed = run()
    monkeypatch.setattr(stacked_triton, "TILES", [(64, 4, 2)])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(stacked_triton, "_TUNERS", {})
    tuned = run()
    # conv1 ... conv3 launches: 2 x 2 x 6 x 6 = 144 output positions, work class floor(log4(144)) = 3
    assert list(stacked_triton._TUNERS) == [stacked_triton.work_class(144)] == [3]
    assert stacked_triton._autotuned(144)[0].best_config.kwargs == {"BLOCK_M": 64}
    assert "BLOCK_M: 64" in stacked_triton.chosen_tiles()["_conv3x3_kernel class 3"]
    for a, b_ in zip(tuned, fixed):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


def test_step_benchmark_checks_the_layouts_against_each_other():
    """scripts/bench_stacked_step.py, which a lent GPU runs unchanged, at tiny sizes: every variant starts
    from the same weights and batch, and the Triton layout's first gradients match grouped convolutions'."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "scripts/bench_stacked_step.py", "--k", "2", "--b", "2", "--width", "4",
                           "--steps", "1", "--predict-images", "2", "--layouts", "grouped", "triton",
                           "--precisions", "fp32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    triton_line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("triton"))
    assert "vs the first" in triton_line, proc.stdout
    grad_diff = float(triton_line.rsplit("gradients ", 1)[1].split()[0])
    assert grad_diff < 1e-5, triton_line


def test_work_class_is_the_floor_of_log4():
    sizes = np.arange(1, 5000)
    expected = np.floor(np.log(sizes) / np.log(4) + 1e-12).astype(int)
    assert [stacked_triton.work_class(int(n)) for n in sizes] == expected.tolist()
    assert stacked_triton.work_class(0) == 0 and stacked_triton.work_class(256 * 256 * 784) == 12
