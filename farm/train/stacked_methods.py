"""Built-in unlearning methods run over K unlearned models at once, on stacked weights (farm.train.stacked).

A stacked method is its one-at-a-time twin of farm.train.methods, stepped for K models in lockstep:

- model k keeps its own loaders, seeded as the engine seeds them for that model alone, so it sees the same
  batches in the same order (and the same augmentations);
- model k keeps its own random draws: a generator that continues the device's global generator from the
  state it would be in for model k alone (the engine seeds it per model before building the model);
- the loss is the sum of the K models' losses, so every stacked tensor's gradient is its own model's and
  one SGD over the stacked tensors is K independent optimisers (momentum and weight decay are
  elementwise); BatchNorm keeps each model's statistics (farm.train.stacked_resnet).

So the K models end where K one-at-a-time runs end, up to the float rounding of the batched kernels.
What a method decides per model before its loop (noise_finetune's noise, erase_repair's layers to reset,
retrain's re-initialisation, salun's saliency mask) runs on each model alone before stacking (prepare).
Every built-in has a twin; a user's method runs one at a time. A twin runs under the autocast its jobs'
`precision` hparam asks for, as the method alone would (farm.train.engine).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from farm.plan import Job
from farm.train.methods import add_weight_noise, count_classes, erase_most_sensitive, reinitialise, saliency_mask
from farm.train.stacked import StackedModels


def following_global(device: torch.device) -> torch.Generator:
    """A generator in the state of the device's global generator now: its draws are the ones the global
    generator would give next (torch.randint(..., generator=g) equals torch.randint(...) from that state)."""
    gen = torch.Generator(device=device)
    gen.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    return gen


def _lockstep(loaders: list[DataLoader]):
    """One pass of every model's loader, a batch of each per step, stacked: x [K, B, ...], y [K, B]. The
    loaders hold sets of one size and one batch size (the run's retain or forget set), so their batches
    line up. Every pass is run to its end, as a for loop over one loader runs it: a pass that ends on a
    whole batch draws once more from its generator then (as DataLoader's sampler does), and zip alone would
    leave all but the first loader's pass before that draw."""
    passes = [iter(loader) for loader in loaders]
    for batches in zip(*passes):
        yield torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
    for rest in passes[1:]:
        if next(rest, None) is not None:
            raise ValueError("stacked loaders of different lengths")


def _cycle_lockstep(loaders: list[DataLoader]):
    """_lockstep without end: each loader starts a new pass (and draws a new order) when it runs out, as
    farm.train.methods._cycle does for one loader."""
    while True:
        yield from _lockstep(loaders)


def _mean_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[K] each model's mean cross-entropy: logits [K, B, C] against its own labels y [K, B]."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(len(logits), -1).mean(1)


def _ce(stack: StackedModels, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[K] each model's mean cross-entropy on its own batch x[k], y[k]."""
    return _mean_ce(stack.forward(x), y)


def _sgd(stack: StackedModels, lr, momentum, weight_decay, steps):
    opt = torch.optim.SGD(list(stack.params.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))


def _steps(stack, retains, loss_fn, epochs, lr, momentum, weight_decay, masks=None) -> None:
    """The twins' shared loop: SGD with a cosine schedule over `epochs` passes of the retain loaders;
    loss_fn(x, y) -> [K] per-model losses on the step's retain batches; masks (stacked parameter name ->
    0/1 tensor) multiply those gradients before each step."""
    opt, sched = _sgd(stack, lr, momentum, weight_decay, epochs * len(retains[0]))
    stack.train()
    for _ in range(epochs):
        for x, y in _lockstep(retains):
            opt.zero_grad(set_to_none=True)
            loss_fn(x, y).sum().backward()
            for name, mask in (masks or {}).items():
                stack.params[name].grad.mul_(mask)
            opt.step()
            sched.step()
    stack.train(False)


def finetune(stack, retains, forgets, gens, prepared, *, lr, epochs, momentum, weight_decay, **used_by_prepare):
    """farm.train.methods.finetune for K models: mean CE on each model's retain batch. Also the loop of the
    methods that change each model before it (prepare): noise_finetune, erase_repair and retrain, whose
    own hyper-parameters (sigma, layers) were used there."""
    _steps(stack, retains, lambda x, y: _ce(stack, x, y), epochs, lr, momentum, weight_decay)


def neggrad_plus(stack, retains, forgets, gens, prepared, *, lr, epochs, alpha, momentum, weight_decay):
    """farm.train.methods.neggrad_plus for K models: alpha * CE(retain) - (1 - alpha) * CE(forget) per model,
    the retain batch's forward pass first (BatchNorm's running statistics see them in that order)."""
    fgt = _cycle_lockstep(forgets)

    def loss(x, y):
        xf, yf = next(fgt)
        return alpha * _ce(stack, x, y) - (1 - alpha) * _ce(stack, xf, yf)

    _steps(stack, retains, loss, epochs, lr, momentum, weight_decay)


def random_label(stack, retains, forgets, gens, prepared, *, lr, epochs, forget_weight, momentum, weight_decay):
    """farm.train.methods.random_label for K models: CE(retain) + forget_weight * CE(forget, a random wrong
    label), model k's labels drawn from gens[k] as its twin draws them from the global generator."""
    _relabel(stack, retains, forgets, gens, prepared[0]["n_classes"], lr, epochs, forget_weight, momentum,
             weight_decay)


def salun(stack, retains, forgets, gens, prepared, *, lr, epochs, mask_fraction, momentum, weight_decay):
    """farm.train.methods.salun for K models: random_label's loop with forget_weight 1, each model's
    gradients masked by its own saliency mask (made before stacking, laid out as the stacked weights)."""
    masks = stack.stacked_like([p["mask"] for p in prepared])
    _relabel(stack, retains, forgets, gens, prepared[0]["n_classes"], lr, epochs, 1.0, momentum, weight_decay,
             masks)


def _relabel(stack, retains, forgets, gens, n_classes, lr, epochs, forget_weight, momentum, weight_decay,
             masks=None):
    """farm.train.methods._relabel_on_retain for K models; masks: stacked parameter name -> 0/1 tensor on
    its gradient, so only the masked weights move."""
    fgt = _cycle_lockstep(forgets)

    def loss(x, y):
        xf, yf = next(fgt)
        shift = torch.stack([torch.randint(1, n_classes, yf[k].shape, device=yf.device, generator=g)
                             for k, g in enumerate(gens)])
        return _ce(stack, x, y) + forget_weight * _ce(stack, xf, (yf + shift) % n_classes)

    _steps(stack, retains, loss, epochs, lr, momentum, weight_decay, masks)


def scrub(stack, retains, forgets, gens, prepared, *, lr, epochs, max_epochs, alpha, gamma, temperature, momentum,
          weight_decay):
    """farm.train.methods.scrub for K models: each model's teacher is its own original (a frozen stack of
    copies, in eval mode); per epoch a max step over the forget loaders while epoch < max_epochs, then a
    min step over the retain loaders, SGD without a schedule, as the twin."""
    teacher = StackedModels(stack.unstack()).train(False)
    opt = torch.optim.SGD(list(stack.params.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def kl(student_logits, x):
        with torch.no_grad():
            teacher_logits = teacher.forward(x)
        return _kl(student_logits, teacher_logits, temperature)

    for epoch in range(epochs):
        stack.train()
        if epoch < max_epochs:
            for x, _ in _lockstep(forgets):
                opt.zero_grad(set_to_none=True)
                (-kl(stack.forward(x), x).sum()).backward()
                opt.step()
        for x, y in _lockstep(retains):
            opt.zero_grad(set_to_none=True)
            out = stack.forward(x)
            (alpha * kl(out, x) + gamma * _mean_ce(out, y)).sum().backward()
            opt.step()
    stack.train(False)


def _kl(student_logits, teacher_logits, t):
    """[K] farm.train.methods._kl per model: KL(teacher || student) on temperature-t softmaxes, the mean over
    the model's batch (batchmean), times t^2."""
    kl = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                  reduction="none", log_target=True)
    return kl.sum(-1).mean(-1) * t * t


@dataclass(frozen=True)
class StackedMethod:
    """A built-in's stacked twin: prepare(net, retain, forget, hparams) runs on each model alone before
    stacking (what the twin does before its loop, in the same order) and may return a dict of what it
    found; run(stack, retains, forgets, gens, prepared, **hparams) gets them, one per model (None: {})."""
    run: Callable
    prepare: Callable = lambda net, retain, forget, hparams: None
    passes: int = 1  # forward passes per step, whose activations a step holds at once: its memory per model


STACKED_METHODS: dict[str, StackedMethod] = {
    "finetune": StackedMethod(finetune),
    "neggrad_plus": StackedMethod(neggrad_plus, passes=2),
    # the twin's forward pass that finds the class count: in train mode, on the retain loader's first batch
    # (its BatchNorm statistics and the loader's generator move, so they move here too)
    "random_label": StackedMethod(random_label,
                                  lambda net, retain, forget, hp: {"n_classes": count_classes(net, retain)},
                                  passes=2),
    "noise_finetune": StackedMethod(finetune, lambda net, retain, forget, hp: add_weight_noise(net, hp["sigma"])),
    # erase_repair's ranking and resets are per-model choices: each model makes its own before stacking
    "erase_repair": StackedMethod(finetune,
                                  lambda net, retain, forget, hp: erase_most_sensitive(net, forget, hp["layers"])),
    "retrain": StackedMethod(finetune, lambda net, retain, forget, hp: reinitialise(net)),
    "scrub": StackedMethod(scrub),
    # salun's saliency mask is each model's own: found before stacking, then laid out as the stacked weights
    "salun": StackedMethod(salun, lambda net, retain, forget, hp: {
        "mask": saliency_mask(net, forget, hp["mask_fraction"]), "n_classes": count_classes(net, retain)},
        passes=2),
}


def stack_key(job: Job) -> tuple | None:
    """Jobs with equal keys can share a stack (the scheduler batches them, the engine stacks them): models
    trained from scratch, whatever their role, or unlearned models of one stackable built-in method and
    one set of hyper-parameters. None: an unlearned job that runs alone."""
    if job.role != "unlearned":
        return ("from scratch",)
    if job.method not in STACKED_METHODS:
        return None
    return ("unlearned", job.method, json.dumps(job.hparams, sort_keys=True))
