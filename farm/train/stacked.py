"""Train K models of one architecture at once by stacking their weights.

Each model keeps its own seed (initialisation), its own training set and its own data order: model k is
initialised exactly as farm.train.loops would initialise it alone (torch.manual_seed(seed_k) then
build_model), and draws its batches from a generator seeded as the single-model path seeds it. The only
difference from one-at-a-time training is the arithmetic order inside the batched kernels, so results
agree to float rounding, not bit for bit.

Why this is exact and not an approximation: the stacked parameters are leaves of shape [K, ...] and the
loss is the sum of the K models' mean losses, so the gradient of the stacked tensor is each model's own
gradient; SGD with momentum and weight decay is elementwise, so one torch.optim.SGD over the stacked
tensors is K independent optimisers.

The stacked forward pass: farm.train.models' SmallCNN runs through farm.train.stacked_cnn's layouts, chosen by
measurement: farm.train.stacked_triton's kernels on an H100-class GPU, grouped convolutions on a CPU (batched
products are the other choice); any other buffer-free module goes through torch.func.vmap(functional_call),
which is generic.

Models whose training sets differ in size (shadow halves of an odd train split) are padded to a common
length with zero-weight entries at the end of each epoch's last batch.

Models with BatchNorm (farm.train.models' ResNet-18) stack as one network of grouped convolutions and
K*C-channel BatchNorm layers (farm.train.stacked_resnet, layout "bn-grouped"): every channel's statistics come
from its own model's batch, so the K models train as they would alone, running statistics included.  Padding
would enter those statistics, so such models stack only with models of the same training-set size
(farm.train.engine groups them).
"""
from __future__ import annotations

import copy
import importlib.util
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from farm.train.models import SmallCNN
from farm.train.stacked_resnet import stack_models, unstack
from farm.train.stacked_cnn import forward_bmm, forward_grouped, forward_triton
from farm.spec import TrainingSpec
from farm.train.loops import apply_query, augment_batch, autocast, is_channels_last, predict_logits


# The stacked SmallCNN layout (farm.train.stacked_cnn), chosen by scripts/bench_stacked_step.py and
# scripts/bench_farm.py (docs/benchmarks.md): on a CPU, grouped convolutions; on a GPU, farm.train.stacked_triton's
# kernels (one launch per convolution for all K models), deterministic or autotuned. They were compiled and
# measured on compute capability 9.0 (H100) only; an sm_86 block (A10G) has too little shared memory for
# their float32 tile, so other GPUs keep the layouts measured best without them (WITHOUT_TRITON).
DEFAULT_LAYOUT = {"cpu": "grouped", "cuda-autotuned": "triton", "cuda-deterministic": "triton"}
WITHOUT_TRITON = {"cuda-autotuned": "grouped", "cuda-deterministic": "bmm"}
LAYOUT: str | None = None  # set to force one layout everywhere (the benchmarks' --layout)


def triton_kernels_measured() -> bool:
    """Whether this process's GPU is of the compute capability the Triton kernels were checked on (9.x)
    and Triton is installed."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and importlib.util.find_spec("triton") is not None)


def default_layout(device: str) -> str:
    if LAYOUT:
        return LAYOUT
    if device == "cuda":
        device += "-autotuned" if torch.backends.cudnn.benchmark else "-deterministic"
        if DEFAULT_LAYOUT.get(device) == "triton" and not triton_kernels_measured():
            return WITHOUT_TRITON[device]
    return DEFAULT_LAYOUT.get(device, "grouped")


# Image-model pairs per prediction chunk: activations grow with both (about 5 GB of float32 for SmallCNN).
PREDICT_PAIRS = 32_768


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether the model holds buffers (BatchNorm running statistics): it then stacks as "bn-grouped"."""
    return any(True for _ in model.buffers())


def can_stack(model: torch.nn.Module) -> bool:
    """Buffer-free models stack through vmap or farm.train.stacked_cnn; models with BatchNorm when every layer
    has a rule in farm.train.stacked_resnet."""
    if not has_batchnorm(model):
        return True
    try:
        stack_models([copy.deepcopy(model).to("meta")])
    except (TypeError, ValueError):
        return False
    return True


class StackedModels:
    """K models of one architecture as stacked parameters, with a forward pass over all of them."""

    def __init__(self, models: list[torch.nn.Module]):
        if not models:
            raise ValueError("StackedModels needs at least one model")
        self.k, self.net = len(models), None
        if has_batchnorm(models[0]):
            if not can_stack(models[0]):
                raise ValueError("these models hold buffers and a layer farm.train.stacked_resnet cannot stack")
            self.net, self.layout = stack_models(models), "bn-grouped"
            if is_channels_last(models[0]):  # the stacked network keeps the models' memory format
                self.net.to(memory_format=torch.channels_last)
            self.params = dict(self.net.named_parameters())
            return
        params, _ = stack_module_state(models)
        # plain strides whatever the models' memory format: farm.train.stacked_cnn's kernels index them so
        self.params = {k: v.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
                       for k, v in params.items()}
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture only; weights come from params

        def one(p, x):
            return functional_call(self.base, p, (x,))

        self._per_model_batch = vmap(one, in_dims=(0, 0))  # x: [K, B, ...]
        self._shared_batch = vmap(one, in_dims=(0, None))  # x: [B, ...], the same inputs for all models
        # "bmm" | "grouped" | "triton" (farm.train.stacked_cnn) for SmallCNN, else "vmap"; scripts/bench_stacked_step.py
        # times them
        device = next(models[0].parameters()).device.type
        self.layout = default_layout(device) if isinstance(models[0], SmallCNN) else "vmap"

    def train(self, mode: bool = True) -> "StackedModels":
        """Train or eval mode: BatchNorm uses batch statistics while training, running ones after."""
        if self.net is not None:
            self.net.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[K, B, n_classes] logits of model k on its own inputs x[k] (x: [K, B, C, H, W])."""
        if self.layout == "bn-grouped":
            return self.net(x)
        if self.layout == "bmm":
            return forward_bmm(self.base, self.params, x)
        if self.layout == "grouped":
            return forward_grouped(self.base, self.params, x, shared=False)
        if self.layout == "triton":
            return forward_triton(self.base, self.params, x, shared=False)
        return self._per_model_batch(self.params, x)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """[K, B, n_classes] logits of every model on the same inputs x: [B, C, H, W]."""
        if self.layout == "bn-grouped":
            return self.net.forward_shared(x)
        if self.layout == "bmm":
            return forward_bmm(self.base, self.params, x.expand(self.k, *x.shape))
        if self.layout == "grouped":
            return forward_grouped(self.base, self.params, x, shared=True)
        if self.layout == "triton":
            return forward_triton(self.base, self.params, x, shared=True)
        return self._shared_batch(self.params, x)

    def stacked_like(self, per_model: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-model tensors of the parameters (K dicts keyed by the models' own parameter names) laid out
        as the stacked parameters, keyed as self.params: stacked along a new dim 0 (vmap and
        farm.train.stacked_cnn's layouts) or concatenated along dim 0 ("bn-grouped")."""
        if self.net is not None:
            return {f"net.{name}": torch.cat([d[name] for d in per_model]) for name in per_model[0]}
        return {name: torch.stack([d[name] for d in per_model]) for name in per_model[0]}

    def unstack(self) -> list[torch.nn.Module]:
        """K ordinary modules with the trained weights (for storing weights, predicting, running a method)."""
        if self.net is not None:
            return [m.eval() for m in unstack(self.net)]
        device = next(iter(self.params.values())).device
        out = []
        for i in range(self.k):
            m = copy.deepcopy(self.base).to_empty(device=device)
            m.load_state_dict({k: v[i].detach() for k, v in self.params.items()})
            out.append(m.eval())
        return out


def train_stacked(stack: StackedModels, images: torch.Tensor, labels: torch.Tensor,
                  train_sets: list[np.ndarray], cfg: TrainingSpec, gens: list[torch.Generator]) -> None:
    """SGD with momentum and a cosine schedule, as farm.train.loops.train_model, for K models at once.

    train_sets[k] are model k's example ids; gens[k] its data-order generator (seeded like the single path).
    """
    device = images.device
    k = stack.k
    sizes = [len(s) for s in train_sets]
    n_max = max(sizes)
    steps_per_epoch = math.ceil(n_max / cfg.batch_size)
    opt = torch.optim.SGD(list(stack.params.values()), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    sets = [torch.tensor(s, dtype=torch.long) for s in train_sets]
    if stack.layout == "bn-grouped" and len(set(sizes)) > 1:
        raise ValueError(f"models with BatchNorm stack only with training sets of one size (padding would enter "
                         f"their batch statistics), got sizes {sorted(set(sizes))}")
    stack.train()
    for _ in range(cfg.epochs):
        # each model's order for this epoch, padded with -1 (weight 0) to the common length
        orders = torch.full((k, n_max), -1, dtype=torch.long)
        for i in range(k):
            orders[i, : sizes[i]] = sets[i][torch.randperm(sizes[i], generator=gens[i])]
        orders = orders.to(device)  # once per epoch: a host copy every step would stall the GPU queue
        for start in range(0, n_max, cfg.batch_size):
            idx = orders[:, start:start + cfg.batch_size]  # [K, B]
            valid = idx >= 0
            safe = idx.clamp(min=0)
            x, y = images[safe], labels[safe]  # [K, B, C, H, W], [K, B]
            if cfg.augment:
                x = torch.stack([augment_batch(x[i], gens[i]) for i in range(k)])
            with autocast(device, cfg.precision):
                logits = stack.forward(x)  # [K, B, n_classes]
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            loss = loss.view(k, -1) * valid
            per_model = loss.sum(1) / valid.sum(1).clamp(min=1)
            opt.zero_grad(set_to_none=True)
            per_model.sum().backward()
            opt.step()
            sched.step()


@torch.no_grad()
def predict_stacked(stack: StackedModels, images: torch.Tensor, queries: tuple[str, ...],
                    batch_size: int, precision: str = "fp32") -> np.ndarray:
    """float32 [K, N, Q, C]: every model's logits for every example under every query.

    On a CPU the models predict one after another in small chunks (farm.train.loops.predict_logits), which
    measured faster than the stacked forward pass there (docs/benchmarks.md). On a GPU a chunk holds at
    most PREDICT_PAIRS image-model pairs (batch_size images for few models, fewer for many): activations
    grow with both, and K=256 models x 4,096 images would not fit on any card."""
    if not images.is_cuda:
        return np.stack([predict_logits(m, images, queries, batch_size, precision) for m in stack.unstack()])
    return predict_stacked_chunks(stack, images, queries, max(1, min(batch_size, PREDICT_PAIRS // stack.k)),
                                  precision)


@torch.no_grad()
def predict_stacked_chunks(stack: StackedModels, images: torch.Tensor, queries: tuple[str, ...], chunk: int,
                           precision: str = "fp32") -> np.ndarray:
    """predict_stacked through the stacked forward pass, `chunk` images at a time (any device), in eval mode
    (BatchNorm's running statistics)."""
    stack.train(False)
    out = None
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk]
        for qi, q in enumerate(queries):
            with autocast(images.device, precision):
                logits = stack.forward_shared(apply_query(x, q))
            if out is None:  # host memory for all of it, pinned on a GPU so the copies run asynchronously
                out = torch.empty((stack.k, len(images), len(queries), logits.shape[-1]), dtype=torch.float32,
                                  pin_memory=images.is_cuda)
            out[:, start:start + len(x), qi].copy_(logits.float(), non_blocking=True)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)  # the non-blocking copies into pinned memory must land first
    return out.numpy()
