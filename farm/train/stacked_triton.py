"""Stacked 3x3 convolutions of K small models, one Triton kernel launch for all K (GPU), optionally fused
with the ReLU and 2x2 max-pool that follow them in farm.train.models' SmallCNN.

cuDNN runs a grouped convolution with groups=K as one small kernel per group, and torch's max-pool
backward over the first layer's full-resolution activations is slow; together they leave an H100/H200
mostly idle for K=256 copies of SmallCNN (docs/benchmarks.md). These kernels treat each of the K
convolutions as an implicit GEMM and run all of them, tile by tile, in one launch.

Activations are [K, B, H, W, C] (model-major, channels-last, as farm.train.stacked_cnn's "bmm" layout) and the
weights the model's own, stacked: w [K, O, C, 3, 3], b [K, O]. With stride 1 and zero padding 1,

    conv[k, b, y, x, o] = b[k, o] + sum_{i, j in 0..2} sum_c in[k, b, y+i-1, x+j-1, c] * w[k, o, c, i, j]

(a cross-correlation, as torch.nn.functional.conv2d). Per model this is a matrix product of M = B*H*W
positions by O channels with a reduction over R = 9*C (tap, channel) pairs, whose operand rows are
gathered from the input on the fly (no im2col copy). With pool=True the kernel also applies

    out[k, b, p, q, o] = relu(max_{s, t in 0..1} conv[k, b, 2p+s, 2q+t, o])

in its epilogue and keeps, per output, which of the 4 positions won (4 where the ReLU zeroed it), so the
full-resolution activations are never written. The gradients are two more implicit GEMMs, whose
grad_conv operand is rebuilt from (grad_out, winner) on the fly when pooled:

    grad_in[k, b, y, x, c] = sum_{i, j, o} grad_conv[k, b, y+i-1, x+j-1, o] * w[k, o, c, 2-i, 2-j]
        (the forward kernel on grad_conv, with the taps flipped and w's channel axes swapped)
    grad_w[k, o, c, i, j]  = sum_{b, y, x} in[k, b, y+i-1, x+j-1, c] * grad_conv[k, b, y, x, o]
    grad_b[k, o]           = sum_{b, y, x} 1 * grad_conv[k, b, y, x, o]
        (one reduction over M, the bias as one more row of the weight gradient whose input is 1 everywhere,
        so grad_conv is read once for both; split into slices whose fp32 partial sums are added in a fixed
        order, so the result is deterministic)

Products accumulate in float32; the inputs' dtype (bf16 under autocast) is the operands' and the output's,
and the max is taken before that rounding. Float32 operands multiply in tf32 where torch lets cuDNN do so
(torch.backends.cudnn.allow_tf32), in full precision otherwise (the bias row too: its gradient is then
summed from tf32-rounded values, as the weights'). scripts/check_triton_compile.py compiles
the kernels for NVIDIA sm_90 (H100/H200); tests run them on a CPU through Triton's interpreter
(TRITON_INTERPRET=1), in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 128  # the weight gradient's positions per step (its summation order); the forward's come from TILES
# Tiles (BLOCK_M, num_warps, num_stages; BLOCK_M a multiple of 16 for tl.dot and of 4 for a pooling
# window). When GPU kernels may be autotuned (resources.gpu_kernels: autotuned, which sets
# torch.backends.cudnn.benchmark), Triton times them on the first launch of each layer and work class
# (work_class) and keeps the fastest, as cuDNN does; "deterministic" always runs the first. The weight
# gradient keeps BLOCK_M (its summation order) and tries the warps and stages only.
TILES = [(128, 4, 3), (128, 8, 3), (64, 4, 3), (64, 4, 4), (256, 8, 3), (128, 4, 4), (64, 8, 2), (256, 4, 2)]
WGRAD_SLICE = 8192  # positions per weight-gradient partial sum: enough programs for a large GPU at any K


@triton.jit
def _load_operand(base, sel_base, bs, yy, xx, c, ok, H, W, C: tl.constexpr, POOLED: tl.constexpr):
    """operand[b, y, x, c] for broadcastable index tensors, 0 where not ok. POOLED: the operand is the
    gradient of a fused conv-ReLU-pool, stored as base [B, H/2, W/2, C] with winners sel_base: it is
    grad_out at (y/2, x/2) where (y, x) won its window, else 0."""
    if POOLED:
        offs = ((bs * (H // 2) + yy // 2) * (W // 2) + xx // 2) * C + c
        v = tl.load(base + offs, mask=ok, other=0.0)
        won = tl.load(sel_base + offs, mask=ok, other=4) == ((yy % 2) * 2 + xx % 2).to(tl.int8)
        return tl.where(won, v, tl.zeros_like(v))
    else:
        return tl.load(base + ((bs * H + yy) * W + xx) * C + c, mask=ok, other=0.0)


@triton.jit(do_not_specialize=["x_model_rows", "M", "H", "W"])
def _conv3x3_kernel(x_ptr, sel_ptr, w_ptr, b_ptr, out_ptr, win_ptr, x_model_rows, M, H, W,
                    C: tl.constexpr, O: tl.constexpr, HAS_BIAS: tl.constexpr, X_POOLED: tl.constexpr,
                    POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                    PRECISION: tl.constexpr):
    """conv[k, m, n] = bias[k, n] + sum_r gather(x[k])[m, r] * w[k, r, n], r = (i*3 + j)*C + c; stored as
    is, or (POOL) as relu(max) over each 2x2 window with the winner in win_ptr."""
    pid_m, pid_n, k = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < O
    if POOL:  # m runs over windows: 4 consecutive positions are one window, windows in (b, p, q) order
        s, win = m % 4, m // 4
        xs = (win % (W // 2)) * 2 + s % 2
        ys = ((win // (W // 2)) % (H // 2)) * 2 + s // 2
        bs = win // ((H // 2) * (W // 2))
    else:
        xs, ys, bs = m % W, (m // W) % H, m // (H * W)
    # a model's input starts x_model_rows * C elements after the previous one (0: a shared input); written as
    # a multiple of C, so the compiler can prove the rows' alignment and load them as vectors, asynchronously
    x_base = x_ptr + k * x_model_rows * C
    sel_base = sel_ptr + k * x_model_rows * C
    w_base = w_ptr + k * (9 * C * O)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if C % BLOCK_R == 0:  # whole channel blocks per tap: contiguous loads along c
        for tap in range(9):  # a loop, not unrolled: compiles in a fraction of the time
            yy, xx = ys + (tap // 3 - 1), xs + (tap % 3 - 1)
            ok = m_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            for c0 in tl.static_range(0, C, BLOCK_R):
                c = c0 + tl.arange(0, BLOCK_R)
                a = _load_operand(x_base, sel_base, bs[:, None], yy[:, None], xx[:, None], c[None, :],
                                  ok[:, None], H, W, C, X_POOLED)
                wt = tl.load(w_base + (tap * C + c)[:, None] * O + n[None, :], mask=n_ok[None, :], other=0.0)
                acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    else:  # few channels (e.g. the first layer's 1 or 3): gather (tap, channel) pairs together
        for r0 in tl.static_range(0, 9 * C, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            tap, c = r // C, r % C
            yy = ys[:, None] + (tap // 3 - 1)[None, :]
            xx = xs[:, None] + (tap % 3 - 1)[None, :]
            ok = m_ok[:, None] & (r < 9 * C)[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            a = _load_operand(x_base, sel_base, bs[:, None], yy, xx, c[None, :], ok, H, W, C, X_POOLED)
            wt = tl.load(w_base + r[:, None] * O + n[None, :], mask=(r < 9 * C)[:, None] & n_ok[None, :],
                         other=0.0)
            acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + k * O + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if POOL:
        windows = tl.reshape(acc, (BLOCK_M // 4, 4, BLOCK_N))
        best = tl.max(windows, axis=1)
        winner = tl.argmax(windows, axis=1)
        alive = best > 0
        q = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)
        offs = k * (M // 4) * O + q[:, None] * O + n[None, :]
        mask = (q < M // 4)[:, None] & n_ok[None, :]
        tl.store(out_ptr + offs, tl.where(alive, best, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(win_ptr + offs, tl.where(alive, winner, 4).to(tl.int8), mask=mask)
    else:
        tl.store(out_ptr + k * M * O + m[:, None] * O + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "H", "W", "n_slices", "slice_len"])
def _conv3x3_wgrad_kernel(x_ptr, g_ptr, sel_ptr, part_ptr, M, H, W, n_slices, slice_len,
                          C: tl.constexpr, O: tl.constexpr, G_POOLED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                          PRECISION: tl.constexpr):
    """part[s, k, r, n] = sum over the positions m of slice s of gather(x[k])[m, r] * grad_conv[k, m, n], for
    r < 9*C (the weights) and r = 9*C (the bias: gather(x[k])[m, 9*C] = 1)."""
    pid_ks, pid_r, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # K*S on the grid's long axis
    k, s = (pid_ks // n_slices).to(tl.int64), pid_ks % n_slices
    n_models = tl.num_programs(0) // n_slices
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok, n_ok = r < 9 * C, n < O
    if C % BLOCK_R == 0:  # one tap per tile, a scalar offset: its channels are contiguous (vector loads)
        tap = pid_r // (C // BLOCK_R)  # 9 in the bias row's tile, where r_ok is all false: no loads
        c = (pid_r % (C // BLOCK_R)) * BLOCK_R + tl.arange(0, BLOCK_R)
        dy, dx = tap // 3 - 1, tap % 3 - 1
    else:  # a (tap, channel) pair per column
        tap, c = r // C, r % C
        dy, dx = (tap // 3 - 1)[None, :], (tap % 3 - 1)[None, :]
    x_base = x_ptr + k * M * C
    g_off = k * (M // 4 if G_POOLED else M) * O
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(s * slice_len, tl.minimum(s * slice_len + slice_len, M), BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < M
        xs, ys, bs = m % W, (m // W) % H, m // (H * W)
        yy = ys[:, None] + dy
        xx = xs[:, None] + dx
        ok = m_ok[:, None] & r_ok[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        a = tl.load(x_base + ((bs[:, None] * H + yy) * W + xx) * C + c[None, :], mask=ok, other=0.0)
        a = tl.where(m_ok[:, None] & (r == 9 * C)[None, :], 1.0, a).to(a.dtype)  # the bias row's input
        g = _load_operand(g_ptr + g_off, sel_ptr + g_off, bs[:, None], ys[:, None], xs[:, None], n[None, :],
                          m_ok[:, None] & n_ok[None, :], H, W, O, G_POOLED)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    part = part_ptr + ((s * n_models + k) * (9 * C + 1) + r[:, None]) * O + n[None, :]
    tl.store(part, acc, mask=(r <= 9 * C)[:, None] & n_ok[None, :])


def _block(n: int, cap: int) -> int:
    """A power of two >= 16 (tl.dot's minimum) that covers n, at most cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _reduction_block(c: int, pairs_cap: int) -> int:
    """Reduction tile: whole channel blocks of one tap where C allows it, else up to pairs_cap (tap, channel)
    pairs."""
    for block in (64, 32, 16):
        if c % block == 0:
            return block
    return _block(9 * c, pairs_cap)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 products on tensor cores in tf32 where torch lets cuDNN use it (torch.backends.cudnn.allow_tf32,
    on by default), else in full precision; other dtypes are unaffected."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"


def conv_constants(c: int, o: int, pool: bool, x_pooled: bool, has_bias: bool, precision: str = "tf32") -> dict:
    """The compile-time constants of one _conv3x3_kernel launch but its tile (BLOCK_M), which TILES give
    (scripts/check_triton_compile.py uses them)."""
    return dict(C=c, O=o, HAS_BIAS=has_bias, X_POOLED=x_pooled, POOL=pool, BLOCK_N=_block(o, 64),
                BLOCK_R=_reduction_block(c, 32), PRECISION=precision)


def wgrad_constants(c: int, o: int, pooled: bool, precision: str = "tf32") -> dict:
    """The compile-time constants of one _conv3x3_wgrad_kernel launch."""
    return dict(C=c, O=o, G_POOLED=pooled, BLOCK_M=BLOCK_M, BLOCK_N=_block(o, 64),
                BLOCK_R=_reduction_block(c, 64), PRECISION=precision)


# Triton's autotuners, one pair per work class (see _autotuned), made on first use.
_TUNERS: dict[int, tuple] = {}


def work_class(positions: int) -> int:
    """A launch's size class: floor(log4(positions)), positions = K x B x H x W output positions. The
    autotuner times tiles on a class's first launch, so a tile tuned on a small launch (the 4-model memory
    probe of Engine.batch_capacity, a last partial batch) does not stick to launches 100x its size."""
    return (max(positions, 1).bit_length() - 1) // 2


def _autotuned(positions: int) -> tuple:
    """The two kernels wrapped in Triton's autotuner over TILES for this launch's work class (their keys:
    the layer's shape constants, so within a class one tuning serves every batch size). The autotuners of
    all classes share the compiled kernels: a new class costs timing, not compiling."""
    cls = work_class(positions)
    if cls not in _TUNERS:
        conv = triton.autotune([triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=st) for m, w, st in TILES],
                               key=["C", "O", "POOL", "X_POOLED", "HAS_BIAS"])(_conv3x3_kernel)
        wgrad = triton.autotune(list({(w, st): triton.Config({}, num_warps=w, num_stages=st)
                                      for _, w, st in TILES}.values()),
                                key=["C", "O", "G_POOLED"])(_conv3x3_wgrad_kernel)
        _TUNERS[cls] = (conv, wgrad)
    return _TUNERS[cls]


def chosen_tiles() -> dict:
    """What the autotuners kept so far, per kernel, work class and key (layer constants and dtypes), as
    text (with a single tile there is nothing to time: the tile last run)."""
    out = {}
    for cls, tuners in sorted(_TUNERS.items()):
        for tuner in tuners:
            name = f"{tuner.fn.__name__} class {cls}"
            out |= {f"{name} {key}": str(config) for key, config in tuner.cache.items()}
            if not tuner.cache and hasattr(tuner, "best_config"):
                out[name] = str(tuner.best_config)
    return out


def _tuning() -> bool:
    """Whether GPU kernels may be autotuned: farm.train.loops.configure_gpu_kernels sets cudnn.benchmark for
    resources.gpu_kernels: autotuned."""
    return torch.backends.cudnn.benchmark


def _conv(x: torch.Tensor, sel: torch.Tensor | None, w_packed: torch.Tensor, bias: torch.Tensor | None,
          shared: bool, k: int, size: tuple[int, int, int], pool: bool):
    """The forward kernel: x [K, B, H, W, C] contiguous ([1, B, H, W, C] with shared: the same input for all
    K; or, with sel, a pooled gradient [K, B, H/2, W/2, C] and its winners), w_packed [K, 9*C, O];
    size = (B, H, W) of the convolution.
    Returns [K, B, H, W, O], or with pool ([K, B, H/2, W/2, O], winners int8 of that shape)."""
    n, h, wd = size
    c, o = x.shape[-1], w_packed.shape[2]
    m = n * h * wd
    shape = (k, n, h // 2, wd // 2, o) if pool else (k, n, h, wd, o)
    out = torch.empty(shape, device=x.device, dtype=x.dtype)
    winners = torch.empty(shape, device=x.device, dtype=torch.int8) if pool else out
    const = conv_constants(c, o, pool, sel is not None, bias is not None, dot_precision(x.dtype))
    args = (x, sel if sel is not None else x, w_packed, bias if bias is not None else w_packed, out, winners,
            0 if shared else x[0].numel() // c, m, h, wd)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(o, const["BLOCK_N"]), k

    if _tuning():
        _autotuned(m * k)[0][grid](*args, **const)
    else:
        _conv3x3_kernel[grid](*args, BLOCK_M=TILES[0][0], num_warps=TILES[0][1], num_stages=TILES[0][2], **const)
    return (out, winners) if pool else out


def _weight_grad(x: torch.Tensor, g: torch.Tensor, sel: torch.Tensor | None = None) -> torch.Tensor:
    """x [K, B, H, W, C], g the gradient at the convolution's output, [K, B, H, W, O] (or, with its
    winners sel, the pooled gradient [K, B, H/2, W/2, O]); all contiguous -> float32 [K, 9*C + 1, O]: the
    packed weights' gradient (rows as pack_weight's), then the bias's."""
    k, n, h, wd, c = x.shape
    o = g.shape[-1]
    m = n * h * wd
    n_slices = triton.cdiv(m, WGRAD_SLICE)
    slice_len = triton.cdiv(triton.cdiv(m, n_slices), BLOCK_M) * BLOCK_M
    n_slices = triton.cdiv(m, slice_len)
    part = torch.empty((n_slices, k, 9 * c + 1, o), device=x.device, dtype=torch.float32)
    const = wgrad_constants(c, o, sel is not None, dot_precision(x.dtype))
    grid = (k * n_slices, triton.cdiv(9 * c + 1, const["BLOCK_R"]), triton.cdiv(o, const["BLOCK_N"]))
    args = (x, g, sel if sel is not None else g, part, m, h, wd, n_slices, slice_len)
    if _tuning():
        _autotuned(m * k)[1][grid](*args, **const)
    else:
        _conv3x3_wgrad_kernel[grid](*args, num_warps=TILES[0][1], num_stages=TILES[0][2], **const)
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
    def forward(ctx, x, w, b, shared, pool):
        k = w.shape[0]
        x = x.contiguous()
        out = _conv(x, None, pack_weight(w), b.contiguous(), shared, k, x.shape[1:4], pool)
        out, winners = out if pool else (out, None)
        ctx.save_for_backward(x, w, winners)
        ctx.shared = shared
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, winners = ctx.saved_tensors
        if ctx.shared:
            raise RuntimeError("stacked_conv3x3: no gradient through a shared input (prediction only)")
        g = grad_out.contiguous()
        k, o, c = w.shape[:3]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv(g, winners, pack_weight_transposed(w), None, False, k, x.shape[1:4], False)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            both = _weight_grad(x, g, winners)  # one pass over g for the weights and the bias
            grad_w = both[:, :9 * c].reshape(k, 3, 3, c, o).permute(0, 4, 3, 1, 2).to(w.dtype)
            grad_b = both[:, 9 * c].to(w.dtype)
        return grad_x, grad_w, grad_b, None, None


def stacked_conv3x3(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, shared: bool = False,
                    pool: bool = False) -> torch.Tensor:
    """K stride-1, padding-1 3x3 convolutions: x [K, B, H, W, C] (or [1, B, H, W, C], the same input for
    every model, with shared=True; no gradient to it then), w [K, O, C, 3, 3], b [K, O] -> [K, B, H, W, O];
    with pool=True, followed by ReLU and a 2x2 stride-2 max-pool (H and W even) -> [K, B, H/2, W/2, O].

    Under autocast the operands are cast to its dtype (bf16), as a cuDNN convolution's would be."""
    if pool and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(f"stacked_conv3x3: pool=True needs an even height and width, got {tuple(x.shape[2:4])}")
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    with torch.autocast(device, enabled=False):
        return _StackedConv3x3.apply(x, w, b, shared, pool)
