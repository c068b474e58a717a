"""Stacked 3x3 convolutions of K small models, one Triton kernel launch for all K (GPU).

cuDNN runs a grouped convolution with groups=K as one small kernel per group, which leaves an H100/H200
mostly idle for K=256 copies of farm.models' SmallCNN (docs/benchmarks.md). These kernels treat each of
the K convolutions as an implicit GEMM and run all of them, for every tile, in one launch.

Activations are [K, B, H, W, C] (model-major, channels-last, as farm.stacked_cnn's "bmm" layout) and the
weights the model's own, stacked: w [K, O, C, 3, 3], b [K, O]. With stride 1 and zero padding 1,

    out[k, b, y, x, o] = b[k, o] + sum_{i, j in 0..2} sum_c in[k, b, y+i-1, x+j-1, c] * w[k, o, c, i, j]

(a cross-correlation, as torch.nn.functional.conv2d). Per model this is a matrix product of M = B*H*W
positions by O channels with a reduction over R = 9*C (tap, channel) pairs, whose operand rows are
gathered from the input on the fly (no im2col copy). Its gradients are two more such products:

    grad_in[k, b, y, x, c] = sum_{i, j, o} grad_out[k, b, y+i-1, x+j-1, o] * w[k, o, c, 2-i, 2-j]
        (the same kernel on grad_out, with the taps flipped and w's channel axes swapped)
    grad_w[k, o, c, i, j]  = sum_{b, y, x} in[k, b, y+i-1, x+j-1, c] * grad_out[k, b, y, x, o]
        (a reduction over M, split into S slices whose fp32 partial sums are added in a fixed order,
        so the result is deterministic)

Products accumulate in float32; the inputs' dtype (bf16 under autocast) is the operands' and the output's.
Triton runs on NVIDIA and AMD GPUs; tests run the same kernels on a CPU through Triton's interpreter
(TRITON_INTERPRET=1), in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 128  # output positions per program; a multiple of 16 (tl.dot) and of the wgrad slices
WGRAD_SLICE = 8192  # positions per weight-gradient partial sum: enough programs for a large GPU at any K


@triton.jit
def _conv3x3_kernel(x_ptr, w_ptr, b_ptr, out_ptr, x_model_stride, M, H, W,
                    C: tl.constexpr, O: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[k, m, n] = bias[k, n] + sum_r gather(x[k])[m, r] * w[k, r, n], r = (i*3 + j)*C + c."""
    pid_m, pid_n, k = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < O
    xs, ys, bs = m % W, (m // W) % H, m // (H * W)
    x_base = x_ptr + k * x_model_stride
    w_base = w_ptr + k * (9 * C * O)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if C % BLOCK_R == 0:  # whole channel blocks per tap: contiguous loads along c
        for tap in tl.static_range(9):
            yy, xx = ys + (tap // 3 - 1), xs + (tap % 3 - 1)
            ok = m_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            row = ((bs * H + yy) * W + xx) * C
            for c0 in tl.static_range(0, C, BLOCK_R):
                c = c0 + tl.arange(0, BLOCK_R)
                a = tl.load(x_base + row[:, None] + c[None, :], mask=ok[:, None], other=0.0)
                wt = tl.load(w_base + (tap * C + c)[:, None] * O + n[None, :], mask=n_ok[None, :], other=0.0)
                acc = tl.dot(a, wt, acc)
    else:  # few channels (e.g. the first layer's 1 or 3): gather (tap, channel) pairs together
        for r0 in tl.static_range(0, 9 * C, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            tap, c = r // C, r % C
            yy = ys[:, None] + (tap // 3 - 1)[None, :]
            xx = xs[:, None] + (tap % 3 - 1)[None, :]
            ok = m_ok[:, None] & (r < 9 * C)[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            a = tl.load(x_base + ((bs[:, None] * H + yy) * W + xx) * C + c[None, :], mask=ok, other=0.0)
            wt = tl.load(w_base + r[:, None] * O + n[None, :], mask=(r < 9 * C)[:, None] & n_ok[None, :],
                         other=0.0)
            acc = tl.dot(a, wt, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + k * O + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + k * M * O + m[:, None] * O + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv3x3_wgrad_kernel(x_ptr, g_ptr, part_ptr, M, H, W, n_slices, slice_len,
                          C: tl.constexpr, O: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """part[s, k, r, n] = sum over the positions m of slice s of gather(x[k])[m, r] * g[k, m, n]."""
    pid_r, pid_n, pid_ks = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k, s = (pid_ks // n_slices).to(tl.int64), pid_ks % n_slices
    n_models = tl.num_programs(2) // n_slices
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok, n_ok = r < 9 * C, n < O
    tap, c = r // C, r % C
    dy, dx = tap // 3 - 1, tap % 3 - 1
    x_base = x_ptr + k * M * C
    g_base = g_ptr + k * M * O
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(s * slice_len, tl.minimum(s * slice_len + slice_len, M), BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < M
        xs, ys, bs = m % W, (m // W) % H, m // (H * W)
        yy = ys[None, :] + dy[:, None]
        xx = xs[None, :] + dx[:, None]
        ok = r_ok[:, None] & m_ok[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        a = tl.load(x_base + ((bs[None, :] * H + yy) * W + xx) * C + c[:, None], mask=ok, other=0.0)
        g = tl.load(g_base + m[:, None] * O + n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, g, acc)
    part = part_ptr + ((s * n_models + k) * (9 * C) + r[:, None]) * O + n[None, :]
    tl.store(part, acc, mask=r_ok[:, None] & n_ok[None, :])


def _block(n: int, cap: int) -> int:
    """A power of two >= 16 (tl.dot's minimum) that covers n, at most cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _reduction_block(c: int) -> int:
    """Reduction tile: whole channel blocks of one tap where C allows it, else (tap, channel) pairs."""
    for block in (64, 32, 16):
        if c % block == 0:
            return block
    return _block(9 * c, 32)


def _conv(x: torch.Tensor, w_packed: torch.Tensor, bias: torch.Tensor | None, model_stride: int,
          k: int) -> torch.Tensor:
    """x [K or 1, B, H, W, C] contiguous, w_packed [K, 9*C, O] -> [K, B, H, W, O] in x's dtype."""
    _, n, h, wd, c = x.shape
    o = w_packed.shape[2]
    m = n * h * wd
    out = torch.empty((k, n, h, wd, o), device=x.device, dtype=x.dtype)
    block_n = _block(o, 64)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(o, block_n), k)
    _conv3x3_kernel[grid](x, w_packed, bias if bias is not None else w_packed, out, model_stride, m, h, wd,
                          C=c, O=o, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                          BLOCK_R=_reduction_block(c))
    return out


def _weight_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x [K, B, H, W, C], g [K, B, H, W, O] (both contiguous) -> float32 [K, 9*C, O]."""
    k, n, h, wd, c = x.shape
    o = g.shape[-1]
    m = n * h * wd
    n_slices = triton.cdiv(m, WGRAD_SLICE)
    slice_len = triton.cdiv(triton.cdiv(m, n_slices), BLOCK_M) * BLOCK_M
    n_slices = triton.cdiv(m, slice_len)
    part = torch.empty((n_slices, k, 9 * c, o), device=x.device, dtype=torch.float32)
    block_r, block_n = _block(9 * c, 64), _block(o, 64)
    grid = (triton.cdiv(9 * c, block_r), triton.cdiv(o, block_n), k * n_slices)
    _conv3x3_wgrad_kernel[grid](x, g, part, m, h, wd, n_slices, slice_len, C=c, O=o,
                                BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=block_r)
    return part.sum(0)


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """[K, O, C, 3, 3] -> [K, 9*C, O], row (i*3 + j)*C + c."""
    k, o, c = w.shape[:3]
    return w.permute(0, 3, 4, 2, 1).reshape(k, 9 * c, o).contiguous()


def pack_weight_transposed(w: torch.Tensor) -> torch.Tensor:
    """[K, O, C, 3, 3] -> [K, 9*O, C] for grad_in: taps flipped, row ((2-i)*3 + (2-j))*O + o."""
    k, o, c = w.shape[:3]
    return w.flip(3, 4).permute(0, 3, 4, 1, 2).reshape(k, 9 * o, c).contiguous()


class _StackedConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, shared):
        k = w.shape[0]
        x = x.contiguous()
        out = _conv(x, pack_weight(w), b.contiguous(), 0 if shared else x[0].numel(), k)
        ctx.save_for_backward(x, w)
        ctx.shared = shared
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        if ctx.shared:
            raise RuntimeError("stacked_conv3x3: no gradient through a shared input (prediction only)")
        g = grad_out.contiguous()
        k = w.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv(g, pack_weight_transposed(w), None, g[0].numel(), k)
        if ctx.needs_input_grad[1]:
            c, o = w.shape[2], w.shape[1]
            grad_w = _weight_grad(x, g).view(k, 3, 3, c, o).permute(0, 4, 3, 1, 2).to(w.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=(1, 2, 3), dtype=torch.float32).to(w.dtype)
        return grad_x, grad_w, grad_b, None


def stacked_conv3x3(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, shared: bool = False) -> torch.Tensor:
    """K stride-1, padding-1 3x3 convolutions: x [K, B, H, W, C] (or [1, B, H, W, C], the same input for
    every model, with shared=True; no gradient to it then), w [K, O, C, 3, 3], b [K, O] -> [K, B, H, W, O].

    Under autocast the operands are cast to its dtype (bf16), as a cuDNN convolution's would be."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    with torch.autocast(device, enabled=False):
        return _StackedConv3x3.apply(x, w, b, shared)
