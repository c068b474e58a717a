"""K copies of a convolutional network with BatchNorm (farm.train.models' ResNet-18) as one network.

Layout: model k's activations are channels k*C .. k*C + C - 1 of one tensor [B, K*C, H, W]; its inputs
x[k] of x [K, B, C, H, W] become h = x.transpose(0, 1).flatten(1, 2). Every layer is replaced by one that
keeps the K models' channels apart:

- Conv2d(Cin, Cout, groups=g) -> Conv2d(K*Cin, K*Cout, groups=K*g), weight = the K weights concatenated
  along the output channels (group k*g + j of the stacked conv is group j of model k);
- BatchNorm2d(C) -> BatchNorm2d(K*C) with the same eps and momentum. BatchNorm's statistics are per
  channel, over (B, H, W), so channel k*C + c sees model k's batch only: the batch statistics, the running
  statistics and their gradients are exactly each model's own;
- Linear(in, out) -> StackedLinear: input [B, K*in] (the flatten of [B, K*C, h, w] is model-major, each
  model in its own (C, h, w) order) viewed as [K, B, in], one batched product with weight [K*out, in]
  viewed as [K, out, in];
- ReLU, max/avg pools, Identity, Flatten(1) and the residual adds of the models' own forward() act on every
  channel alone, so they are kept as they are.

Only leaf modules are replaced: containers (torchvision's ResNet, BasicBlock, Bottleneck, Sequential) keep
their forward(), so the residual structure is the original code's. A container's forward() must only use
channel-wise or elementwise operations (adds, ReLU, torch.flatten(x, 1) of the pooled map): a channel
concatenation, shuffle or reshape across channels would mix models. Leaves without a rule raise TypeError.

Every parameter and buffer of the stacked network is the K models' tensors concatenated along dim 0, so
unstack() cuts each into K pieces. Like farm.train.stacked, the sum of the K models' losses gives every
model its own gradient, so one SGD (momentum, weight decay) over the stacked parameters is K optimisers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# Leaves without parameters that act on each channel alone: kept unchanged in the stacked layout.
CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity)


def _cat(tensors: list[torch.Tensor], like: nn.Parameter | None = None) -> torch.Tensor | nn.Parameter:
    """The K tensors concatenated along dim 0 (a Parameter with like's requires_grad when like is given)."""
    out = torch.cat([t.detach() for t in tensors])
    return out if like is None else nn.Parameter(out, requires_grad=like.requires_grad)


class StackedLinear(nn.Module):
    """K Linear(in, out) layers on x [..., K*in] -> [..., K*out], model k on slice k*in .. k*in + in - 1.

    weight [K*out, in] and bias [K*out] are the K layers' concatenated along dim 0, like the stacked
    convolutions, so unstacking is the same cut for every tensor."""

    def __init__(self, k: int, in_features: int, out_features: int, weight: nn.Parameter,
                 bias: nn.Parameter | None) -> None:
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(-1, self.k, self.in_features).transpose(0, 1)  # [K, N, in]
        w = self.weight.view(self.k, self.out_features, self.in_features).transpose(1, 2)  # [K, in, out]
        if self.bias is None:
            out = torch.bmm(h, w)
        else:
            out = torch.baddbmm(self.bias.view(self.k, 1, self.out_features), h, w)
        return out.transpose(0, 1).reshape(*lead, self.k * self.out_features)

    def extra_repr(self) -> str:
        return f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class StackedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over K*C channels, plus count_offset [K]: model k's num_batches_tracked is this
    module's num_batches_tracked + count_offset[k] (the stacked models may have been trained for different
    numbers of steps before stacking; they step together afterwards)."""

    def __init__(self, k: int, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.k = k
        self.register_buffer("count_offset", torch.zeros(k, dtype=torch.long))


def _stack_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    c, k = convs[0], len(convs)
    with torch.device("meta"):  # no initialisation of K models' weights only to overwrite them
        out = nn.Conv2d(k * c.in_channels, k * c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                        k * c.groups, c.bias is not None, c.padding_mode)
    out.weight = _cat([m.weight for m in convs], c.weight)
    if c.bias is not None:
        out.bias = _cat([m.bias for m in convs], c.bias)
    return out


def _stack_batchnorm(bns: list[nn.BatchNorm2d]) -> StackedBatchNorm2d:
    b, k = bns[0], len(bns)
    with torch.device("meta"):
        out = StackedBatchNorm2d(k, k * b.num_features, eps=b.eps, momentum=b.momentum, affine=b.affine,
                                 track_running_stats=b.track_running_stats)
    if b.affine:
        out.weight, out.bias = _cat([m.weight for m in bns], b.weight), _cat([m.bias for m in bns], b.bias)
    if not b.track_running_stats:  # no statistics, no count: the offsets only need to exist
        out.count_offset = torch.zeros(k, dtype=torch.long, device=b.weight.device if b.affine else None)
        return out
    out.running_mean = _cat([m.running_mean for m in bns])
    out.running_var = _cat([m.running_var for m in bns])
    counts = torch.stack([m.num_batches_tracked.detach() for m in bns])
    if b.momentum is None and not bool((counts == counts[0]).all()):
        # momentum=None is a cumulative average weighted by the count: one shared count must be everyone's
        raise ValueError("BatchNorm with momentum=None: the models' num_batches_tracked differ, cannot stack")
    out.num_batches_tracked = counts[0].clone()
    out.count_offset = counts - counts[0]
    return out


def _stack_linear(linears: list[nn.Linear]) -> StackedLinear:
    lin = linears[0]
    bias = None if lin.bias is None else _cat([m.bias for m in linears], lin.bias)
    return StackedLinear(len(linears), lin.in_features, lin.out_features,
                         _cat([m.weight for m in linears], lin.weight), bias)


def _stack_leaf(name: str, mods: list[nn.Module]) -> nn.Module | None:
    """The stacked replacement of the K models' leaf `name`, or None where the leaf is kept unchanged."""
    first = mods[0]
    # the exact class and its hyper-parameters (extra_repr: kernel, stride, groups, eps, momentum, ...)
    if any(type(m) is not type(first) or m.extra_repr() != first.extra_repr() for m in mods):
        raise ValueError(f"stack_models: the models' {name or 'root'} ({type(first).__name__}) differ")
    if type(first) is nn.Conv2d:
        return _stack_conv(mods)
    if type(first) is nn.BatchNorm2d:
        return _stack_batchnorm(mods)
    if type(first) is nn.Linear:
        return _stack_linear(mods)
    if isinstance(first, CHANNELWISE) or (type(first) is nn.Flatten and first.start_dim == 1
                                          and first.end_dim == -1):
        return None
    raise TypeError(f"stack_models has no rule for {name or 'root'} ({type(first).__name__})")


class StackedNet(nn.Module):
    """K models as one network over the layout [B, K*C, H, W] (see the module's docstring).

    net holds the stacked layers inside the models' own containers; template (kept out of the module
    tree, on the meta device) is the architecture unstack() rebuilds each model from."""

    def __init__(self, net: nn.Module, k: int, template: nn.Module) -> None:
        super().__init__()
        self.net, self.k = net, k
        self.training = net.training
        self.__dict__["template"] = template  # not a submodule: no meta parameters in parameters()/state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [K, B, C, H, W], model k's own batch x[k] -> logits [K, B, n_classes]."""
        if x.dim() < 2 or x.shape[0] != self.k:
            raise ValueError(f"StackedNet of {self.k} models: expected inputs [K={self.k}, B, ...], got "
                             f"{tuple(x.shape)}")
        out = self.net(x.transpose(0, 1).flatten(1, 2))  # [B, K*C, H, W] -> [B, K*n_classes]
        return out.view(out.shape[0], self.k, -1).transpose(0, 1)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], the same batch for every model -> logits [K, B, n_classes] (in train mode, each
        model's BatchNorm sees this batch)."""
        return self.forward(x.unsqueeze(0).expand(self.k, *x.shape))


def stack_models(models: list[nn.Module]) -> StackedNet:
    """One StackedNet holding copies of the K models' parameters and buffers (BatchNorm running statistics
    and counts included), in the mode (train or eval) of models[0]."""
    if not models:
        raise ValueError("stack_models needs at least one model")
    if any(type(m) is not type(models[0]) for m in models):
        raise ValueError("stack_models: the models are not all of one class")
    sources = [dict(m.named_modules()) for m in models]
    net = copy.deepcopy(models[0])  # the containers and their forward(); every leaf with weights is replaced
    for name, mod in list(net.named_modules()):
        if any(True for _ in mod.children()):
            # a container's own tensors would have no layout rule (its forward may use them any way)
            if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
                raise TypeError(f"stack_models: {name or 'root'} ({type(mod).__name__}) holds tensors itself")
            continue
        stacked = _stack_leaf(name, [s[name] for s in sources])
        if stacked is None:
            continue
        if not name:  # the model is a single layer
            net = stacked
        else:
            net.set_submodule(name, stacked)
    net.train(models[0].training)
    return StackedNet(net, len(models), copy.deepcopy(models[0]).to("meta"))


def model_state(stacked: StackedNet, k: int) -> dict[str, torch.Tensor]:
    """Model k's state_dict, cut out of the stacked tensors (each the K models' along dim 0)."""
    state = {}
    for mname, mod in stacked.net.named_modules():
        prefix = f"{mname}." if mname else ""
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if isinstance(mod, StackedBatchNorm2d) and name == "count_offset":
                continue
            if isinstance(mod, StackedBatchNorm2d) and name == "num_batches_tracked":
                state[prefix + name] = (t + mod.count_offset[k]).detach().clone()
            else:
                state[prefix + name] = t.detach().unflatten(0, (stacked.k, -1))[k].clone()
    return state


def unstack(stacked: StackedNet) -> list[nn.Module]:
    """K ordinary modules of the original class with the stacked weights and statistics, in the stacked
    network's mode (train or eval); their state_dicts load into a fresh model with strict=True."""
    device = next(stacked.net.parameters()).device
    out = []
    for k in range(stacked.k):
        m = copy.deepcopy(stacked.template).to_empty(device=device)
        m.load_state_dict(model_state(stacked, k), strict=True)
        out.append(m.train(stacked.training))
    return out
