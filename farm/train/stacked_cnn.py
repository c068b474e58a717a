"""farm.train.models' SmallCNN evaluated for K models at once from stacked parameters, without vmap.

Three layouts of the activations, with the same parameters and the same results up to float rounding
(scripts/bench_stacked_step.py times them; docs/benchmarks.md has the figures and the choice):

- "bmm" [K, B, H, W, C], model-major and channels-last: a 3x3 convolution is an im2col copy
  ([K, B*H*W, C*9]) and one batched matrix product with the K weight matrices; the linear layers are
  batched products too, so all the arithmetic is large matrix products on the tensor cores;
- "grouped" [B, K*C, H, W], model k owning channels k*C .. k*C + C - 1: each convolution is one cuDNN call
  with groups=K (channels-last in memory on a GPU); a shared input (prediction) meets the first
  convolution as one ordinary convolution with K*C filters;
- "triton" [K, B, H, W, C] as "bmm", each convolution one launch of farm.train.stacked_triton's implicit-GEMM
  kernel for all K models, fused with the ReLU and max-pool after it (GPU; no im2col copy, no per-group
  kernels, no full-resolution activations).

ReLU and max-pool are applied in the order pool, ReLU where the model has ReLU then pool: they commute
exactly (ReLU is monotonic, so max(relu(a), relu(b)) = relu(max(a, b))), and pooling first makes the ReLU
pass over a quarter of the values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _features(base: nn.Module, h: torch.Tensor, conv, pool) -> torch.Tensor:
    """Walk base.features with layout-specific conv(h, index, layer) and pool(h, layer), ReLU deferred past
    a following max-pool."""
    relu_due = False
    for i, layer in enumerate(base.features):
        if isinstance(layer, nn.Conv2d):
            if relu_due:
                h, relu_due = F.relu(h), False
            h = conv(h, i, layer)
        elif isinstance(layer, nn.ReLU):
            relu_due = True
        elif isinstance(layer, nn.MaxPool2d):
            h = pool(h, layer)
        else:
            raise TypeError(f"stacked SmallCNN has no rule for {type(layer).__name__}")
    return F.relu(h) if relu_due else h


def _classifier(base: nn.Module, params: dict, feats: torch.Tensor, first_weight=None) -> torch.Tensor:
    """base.classifier on feats [K, B, F] with batched products; first_weight replaces the first linear
    layer's weight (to match a flatten order other than the model's (C, H, W))."""
    h = feats
    for i, layer in enumerate(base.classifier):
        if isinstance(layer, nn.Flatten):
            continue
        if isinstance(layer, nn.Linear):
            w = params[f"classifier.{i}.weight"] if first_weight is None else first_weight
            first_weight = None
            h = torch.baddbmm(params[f"classifier.{i}.bias"][:, None, :], h, w.transpose(1, 2))
        elif isinstance(layer, nn.ReLU):
            h = F.relu(h)
        else:
            raise TypeError(f"stacked SmallCNN has no rule for {type(layer).__name__}")
    return h


# ----------------------------------------------------------------------------------- layout "bmm"

def _conv_bmm(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """h [K, B, H, W, C] -> [K, B, H', W', O]: im2col, then out[k] = cols[k] @ w[k]^T + b[k]."""
    if layer.stride != (1, 1) or layer.dilation != (1, 1) or layer.groups != 1:
        raise ValueError("the bmm layout handles stride-1, undilated, ungrouped convolutions only")
    k, n, _, _, c = h.shape
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    padded = F.pad(h, (0, 0, pw, pw, ph, ph))
    patches = padded.unfold(2, kh, 1).unfold(3, kw, 1)  # [K, B, H', W', C, kh, kw], a view
    out_h, out_w = patches.shape[2], patches.shape[3]
    cols = patches.reshape(k, n * out_h * out_w, c * kh * kw)  # (C, kh, kw) order, as w.flatten(2)
    out = torch.baddbmm(b[:, None, :], cols, w.flatten(2).transpose(1, 2))  # [K, B*H'*W', O]
    return out.view(k, n, out_h, out_w, -1)


def _pool_bmm(h: torch.Tensor, layer: nn.MaxPool2d) -> torch.Tensor:
    k, n = h.shape[:2]
    nchw = h.flatten(0, 1).permute(0, 3, 1, 2)  # channels-last strides: max_pool2d keeps them
    out = F.max_pool2d(nchw, layer.kernel_size, layer.stride, layer.padding)
    return out.permute(0, 2, 3, 1).reshape(k, n, out.shape[2], out.shape[3], out.shape[1])


def _classify_channels_last(base: nn.Module, params: dict, h: torch.Tensor) -> torch.Tensor:
    """base.classifier on features h [K, B, H, W, C] -> logits [K, B, n_classes]."""
    _, n, hh, ww, c = h.shape
    first = next(i for i, m in enumerate(base.classifier) if isinstance(m, nn.Linear))
    w = params[f"classifier.{first}.weight"]  # [K, out, C*H*W]: reorder its columns to (H, W, C)
    k = w.shape[0]
    w = w.view(k, -1, c, hh, ww).permute(0, 1, 3, 4, 2).reshape(k, w.shape[1], -1)
    return _classifier(base, params, h.reshape(k, n, -1), first_weight=w)


def forward_bmm(base: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    """x [K, B, C, H, W] -> logits [K, B, n_classes]."""
    h = _features(base, x.permute(0, 1, 3, 4, 2),
                  lambda h, i, layer: _conv_bmm(h, params[f"features.{i}.weight"], params[f"features.{i}.bias"],
                                                layer),
                  _pool_bmm)
    return _classify_channels_last(base, params, h)


# -------------------------------------------------------------------------------- layout "triton"

def forward_triton(base: nn.Module, params: dict, x: torch.Tensor, shared: bool) -> torch.Tensor:
    """x [K, B, C, H, W] (shared=False) or [B, C, H, W] the same for all models (shared=True) -> logits
    [K, B, n_classes]. Every convolution is one farm.train.stacked_triton kernel launch for all K models, fused
    with the ReLU and 2x2 max-pool after it where the model has them (and the feature map is even-sized)."""
    from farm.train.stacked_triton import stacked_conv3x3  # imports Triton: only when this layout runs

    layers = list(base.features)
    h = (x.unsqueeze(0) if shared else x).permute(0, 1, 3, 4, 2)  # [K or 1, B, H, W, C]
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d):
            if (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups) != \
                    ((3, 3), (1, 1), (1, 1), (1, 1), 1):
                raise ValueError("the triton layout handles 3x3 convolutions with stride 1 and padding 1 only")
            fuse = (i + 2 < len(layers) and isinstance(layers[i + 1], nn.ReLU) and _is_pool2(layers[i + 2])
                    and h.shape[2] % 2 == 0 and h.shape[3] % 2 == 0)
            h = stacked_conv3x3(h, params[f"features.{i}.weight"], params[f"features.{i}.bias"],
                                shared=shared and i == 0, pool=fuse)
            i += 3 if fuse else 1
        elif isinstance(layer, nn.ReLU):
            h, i = F.relu(h), i + 1
        elif isinstance(layer, nn.MaxPool2d):
            h, i = _pool_bmm(h, layer), i + 1
        else:
            raise TypeError(f"stacked SmallCNN has no rule for {type(layer).__name__}")
    return _classify_channels_last(base, params, h)


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _is_pool2(layer: nn.Module) -> bool:
    """A 2x2, stride-2, unpadded max-pool (what farm.train.stacked_triton fuses)."""
    return (isinstance(layer, nn.MaxPool2d) and _pair(layer.kernel_size) == (2, 2) and _pair(layer.stride) == (2, 2)
            and _pair(layer.padding) == (0, 0) and _pair(layer.dilation) == (1, 1) and not layer.ceil_mode)


# ------------------------------------------------------------------------------- layout "grouped"

def forward_grouped(base: nn.Module, params: dict, x: torch.Tensor, shared: bool) -> torch.Tensor:
    """x [K, B, C, H, W] (shared=False) or [B, C, H, W] the same for all models (shared=True) ->
    logits [K, B, n_classes]."""
    k = params[next(iter(params))].shape[0]
    h = x if shared else x.transpose(0, 1).flatten(1, 2)  # [B, G*C, H, W], G = 1 or K
    if h.is_cuda:
        h = h.contiguous(memory_format=torch.channels_last)
    groups = [1 if shared else k]

    def conv(h, i, layer):
        w, b = params[f"features.{i}.weight"], params[f"features.{i}.bias"]
        out = F.conv2d(h, w.flatten(0, 1), b.flatten(), stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation, groups=groups[0] * layer.groups)
        groups[0] = k
        return out

    h = _features(base, h, conv, lambda h, layer: F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding))
    feats = h.reshape(h.shape[0], k, -1).transpose(0, 1)  # [K, B, C*H*W], the model's flatten order
    return _classifier(base, params, feats)
