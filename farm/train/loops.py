"""Training and prediction in plain PyTorch: no Ray here, so the same code runs in a Ray actor, in a plain
loop, or on a machine without Ray (the GPU benchmark machine).

Determinism: every random draw (initialisation, data order, augmentation) comes from generators seeded
by the job's seed, and deterministic algorithms are requested, so on CPU the same seed with the same
thread count gives the same weights and logits, bit for bit.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from farm.spec import TrainingSpec, parse_query


def set_determinism(seed: int) -> torch.Generator:
    """Seed torch's global RNG (model init, dropout) and return a generator for data order."""
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed + 1)
    return gen


def configure_gpu_kernels(device: torch.device, kernels: str = "deterministic") -> None:
    """On CUDA, "deterministic" asks for deterministic kernels; "autotuned" lets cuDNN pick kernels by
    timing them (faster for some shapes, not bit-reproducible). CPU kernels are already deterministic for a
    fixed thread count, and the flag costs seconds of imports there."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = kernels == "autotuned"
        torch.use_deterministic_algorithms(kernels == "deterministic", warn_only=True)


def in_memory_format(x, memory_format: str):
    """A module (its 4-D weights, in place) or a 4-D image tensor in resources.memory_format: "channels_last"
    (NHWC strides, what tensor-core convolutions read directly) or "contiguous" (left as it is). Batches
    indexed from channels_last images stay channels_last, and so do a channels_last convolution's outputs."""
    if memory_format != "channels_last" or (isinstance(x, torch.Tensor) and x.dim() != 4):
        return x
    return x.to(memory_format=torch.channels_last) if isinstance(x, torch.nn.Module) \
        else x.contiguous(memory_format=torch.channels_last)


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's 4-D weights lie in NHWC strides: the first one whose two layouts differ (more than
    one input channel and pixel) says."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] * p.shape[-2] > 1:
            return p.is_contiguous(memory_format=torch.channels_last)
    return False


def compiled(model: torch.nn.Module, compile_: bool) -> torch.nn.Module:
    """The model, its calls compiled by torch.compile when resources.compile is on (Module.compile, in place:
    the module stays itself, its state_dict keys and all, so methods, stacking and the store see a plain
    model). Compiling is lazy and once per process: a new model of the same architecture reuses the graphs
    (one per training mode, grad mode, autocast state and batch shape; a second batch shape, such as the
    last partial batch, compiles one graph with a dynamic batch size for all others). A deep copy runs
    uncompiled. Calling it again on a compiled model only re-wraps it."""
    if compile_:
        model.compile()
    return model


def autocast(device: torch.device, precision: str, weight_cache: bool = True):
    """The context a forward pass runs in: bf16 autocast for "bf16" (and for "auto" on a GPU), else nothing.
    Only the forward pass runs under it; losses are taken in float32 and the weights stay float32.
    weight_cache: autocast keeps the bf16 copy of each weight it casts until the outermost autocast ends,
    which is right only while the weights do not change inside it (see method_autocast)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=weight_cache)
    return contextlib.nullcontext()


def method_autocast(device: torch.device, precision: str):
    """The autocast a whole unlearning method runs under (its hparams' `precision`, farm.train.engine).
    Unlike a training step's, it spans the method's optimiser steps, so its weight cache is off: a weight's
    cached bf16 copy would outlive the step that changes the weight, and every later forward pass would
    read the stale copy. A method that enters autocast itself inherits that setting (torch.autocast's
    default), so it too reads the weights as they are."""
    return autocast(device, precision, weight_cache=False)


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (zero padding) and a random horizontal flip, per image."""
    n, _, h, w = x.shape
    pad = 2
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # [n, w]
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, train_idx: np.ndarray,
                cfg: TrainingSpec, gen: torch.Generator) -> None:
    """SGD with momentum and a cosine learning-rate schedule over cfg.epochs on images[train_idx]."""
    device = images.device
    idx = torch.tensor(train_idx, dtype=torch.long)  # a copy: Ray hands out read-only arrays
    steps_per_epoch = math.ceil(len(idx) / cfg.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(cfg.epochs):
        order = idx[torch.randperm(len(idx), generator=gen)].to(device)  # once an epoch, not every step
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            x, y = images[batch], labels[batch]
            if cfg.augment:
                x = augment_batch(x, gen)
            opt.zero_grad(set_to_none=True)
            with autocast(device, cfg.precision):
                out = model(x)
            loss_fn(out.float(), y).backward()
            opt.step()
            sched.step()
    model.eval()


def apply_query(x: torch.Tensor, query: str) -> torch.Tensor:
    """The input as a query sees it: plain, horizontally flipped, or shifted by (dx, dy) with zero fill."""
    kind, dx, dy = parse_query(query)
    if kind == "plain":
        return x
    if kind == "hflip":
        return x.flip(-1)
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


# On a CPU, prediction chunks of about this many input pixels keep the first layers' activations in the
# caches. With this cap (128 fashion-mnist images a chunk), and stacked models predicting one by one,
# predicting took 28.5 s a model instead of 46.1 s with 4,096-image stacked chunks (docs/benchmarks.md,
# "Prediction on a CPU").
CPU_CHUNK_PIXELS = 100_000


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, queries: tuple[str, ...],
                   batch_size: int, precision: str = "fp32") -> np.ndarray:
    """float32 [N, Q, C]: the model's logits for every example under every query."""
    model.eval()
    outs = []
    if images.device.type == "cpu":  # chunks of about CPU_CHUNK_PIXELS input pixels (see its comment)
        batch_size = max(1, min(batch_size, CPU_CHUNK_PIXELS // (images.shape[-2] * images.shape[-1])))
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        with autocast(images.device, precision):
            logits = torch.stack([model(apply_query(x, q)) for q in queries], dim=1)
        outs.append(logits.float().cpu())
    return torch.cat(outs).numpy()


class BatchLoader(DataLoader):
    """A DataLoader over tensors (on the GPU or the CPU) that gathers each batch with one index operation,
    instead of indexing batch_size examples one at a time and stacking them (the default collate, which
    kept the finetune phase on a GPU at one example per step).  It is a DataLoader, with .dataset,
    .batch_size, .sampler, .generator and len() as usual, and yields the same batches in the same order as
    DataLoader(dataset, batch_size, shuffle, generator=...) with the same generator: per pass it draws the
    same numbers (DataLoader's base seed, then RandomSampler's torch.randperm) from that generator.

    augment_seed: augment every batch where it lives (augment_batch: random shifts and flips), with draws
    from a generator of its own, so the batches' order is the same with and without augmentation."""

    def __init__(self, *args, augment_seed: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.augment_gen = None if augment_seed is None else torch.Generator().manual_seed(augment_seed)

    def __iter__(self):
        images, labels = self.dataset.tensors
        n, bs = len(images), self.batch_size
        # the draws DataLoader makes, in its order: the iterator's base seed, then the sampler's permutation,
        # then (when the sampler runs out, RandomSampler's trailing slice) a second permutation it discards
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        gen = self.sampler.generator if isinstance(self.sampler, torch.utils.data.RandomSampler) else None
        order = None if gen is None else torch.randperm(n, generator=gen).to(images.device)
        for start in range(0, n, bs):
            if gen is not None and start + bs > n:  # a partial last batch: the sampler ran out before it
                torch.randperm(n, generator=gen)
            idx = slice(start, start + bs) if order is None else order[start:start + bs]
            x = images[idx]
            yield (x if self.augment_gen is None else augment_batch(x, self.augment_gen)), labels[idx]
        if gen is not None and n % bs == 0:  # full batches only: the sampler runs out when one more is asked
            torch.randperm(n, generator=gen)


# The augmentation stream's seed is the loader's plus this: apart from every order seed (31 bits plus a few).
AUGMENT_SEED_OFFSET = 1 << 32


def make_loader(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray, batch_size: int,
                shuffle: bool, seed: int, augment: bool = False) -> DataLoader:
    """A loader over a subset, as the competition's unlearn() signature expects: seeded order, whole batches
    gathered from the tensors where they live (BatchLoader), augmented there when asked (augment_batch)."""
    sel = torch.tensor(idx, dtype=torch.long)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return BatchLoader(TensorDataset(images[sel.to(images.device)], labels[sel.to(labels.device)]),
                       batch_size=batch_size, shuffle=shuffle, generator=gen,
                       augment_seed=seed + AUGMENT_SEED_OFFSET if augment else None)


def accuracy(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float | None:
    return float((pred[mask] == labels[mask]).mean()) if mask.any() else None
