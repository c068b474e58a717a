"""Unlearning methods with the NeurIPS 2023 challenge's signature:

    unlearn(net, retain, forget, validation, **hparams) -> net

where retain, forget and validation are torch DataLoaders of (image, label) batches. Each built-in method
declares its hyper-parameter space (name, type, range, default, a small grid) so specs are checked before
anything runs and `ufarm tune` knows what to search.

Every built-in draws its randomness only from torch's global generator (which the engine seeds from the
model's seed before calling) and from the loaders (seeded by the engine), so the same model id gives the
same weights on the same device and thread count.

A user's method is named in the spec by import path (`mypkg.mymodule:unlearn`) or by file path
(`./my_method.py:unlearn`, relative to the working directory of ufarm and of its Ray workers); it is
called with exactly the competition's arguments. It may declare a space as a function attribute
`unlearn.hparam_space = {"lr": {"type": "float", "low": 1e-4, "high": 1, "log": True, "default": 0.01}}`;
without one, any hparams in the spec are passed through unchecked. See docs/methods.md.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from farm.spec import FARM_HPARAMS, SpecError, is_file_ref

PARAM_TYPES = ("float", "int", "bool", "choice")
# Consumed by the farm, never passed on; part of the hparams hash, so of the model id: seed (a replicate
# seed), augment (the retain and forget loaders augment their batches, farm.train.loops.make_loader) and
# precision (the autocast the method runs under, farm.train.engine).
RESERVED_HPARAMS = ("seed", *FARM_HPARAMS)


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its type, allowed range (or choices), default, and a small default grid."""
    name: str
    type: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    grid: tuple = ()  # the values `ufarm tune` tries when the spec names the parameter without values
    help: str = ""

    def check(self, value, where: str):
        """The value converted to the parameter's type; SpecError naming field, value and range otherwise."""
        if self.type == "bool":
            if not isinstance(value, bool):
                raise SpecError(f"{where} must be true or false, got {value!r}")
            return value
        if self.type == "choice":
            if value not in self.choices:
                raise SpecError(f"{where} must be one of {list(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where} must be a{'n integer' if self.type == 'int' else ' number'}, got {value!r}")
        if self.type == "int":
            if value != int(value):
                raise SpecError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise SpecError(f"{where} must lie in [{self.low}, {self.high}], got {value!r}")
        return value

    def describe(self) -> dict:
        d = {"type": self.type, "default": self.default}
        if self.type in ("int", "float"):
            d.update(low=self.low, high=self.high, log=self.log)
        if self.choices:
            d["choices"] = list(self.choices)
        if self.grid:
            d["grid"] = list(self.grid)
        return d


@dataclass(frozen=True)
class Method:
    name: str  # the spec's reference: a built-in name, module:function or path.py:function
    fn: Callable
    space: dict = field(default_factory=dict)  # name -> Param; empty and open for an undeclared user method
    source: str = ""
    open_space: bool = False  # a user method without a declared space: hparams pass through unchecked

    @property
    def defaults(self) -> dict:
        return {k: p.default for k, p in self.space.items()}

    def resolve(self, hparams: dict) -> dict:
        """The keyword arguments the method is called with: declared defaults, overridden by hparams
        (checked against the space), without the farm's reserved keys."""
        hparams = {k: v for k, v in hparams.items() if k not in RESERVED_HPARAMS}
        if self.open_space:
            return {**self.defaults, **hparams}
        unknown = sorted(set(hparams) - set(self.space))
        if unknown:
            raise SpecError(f"method {self.name!r} has no hyper-parameter(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(self.space) or 'none'}")
        out = dict(self.defaults)
        for k, v in hparams.items():
            out[k] = self.space[k].check(v, f"method {self.name!r} hparams.{k}")
        return out


# ------------------------------------------------------------------------------------------- helpers

def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _sgd(net, lr, momentum, weight_decay, params=None):
    return torch.optim.SGD(net.parameters() if params is None else params, lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def _cycle(loader):
    """An endless iterator over a loader (re-shuffled by the loader's own seeded generator each pass)."""
    while True:
        yield from loader


def _train_on(net, loader, epochs, lr, momentum, weight_decay, mask=None):
    """SGD with a cosine schedule on one loader (cross-entropy); mask: name -> 0/1 tensor on the grads."""
    device = _device(net)
    opt = _sgd(net, lr, momentum, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    net.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x.to(device)), y.to(device)).backward()
            _apply_mask(net, mask)
            opt.step()
            sched.step()
    net.eval()
    return net


def _apply_mask(net, mask):
    if mask is None:
        return
    for name, p in net.named_parameters():
        if p.grad is not None and name in mask:
            p.grad.mul_(mask[name])


def _random_other_labels(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """A uniformly random label different from y, per example (torch's global generator)."""
    shift = torch.randint(1, n_classes, y.shape, device=y.device)
    return (y + shift) % n_classes


def count_classes(net, loader) -> int:
    """The net's number of outputs, from one forward pass on the loader's first batch (a new pass of the
    loader, so its generator draws; in whatever mode the net is in)."""
    x, _ = next(iter(loader))
    with torch.no_grad():
        return int(net(x[:1].to(_device(net))).shape[-1])


def _forget_grads(net, forget) -> dict[str, torch.Tensor]:
    """Accumulated gradients of the cross-entropy on the whole forget set, per parameter."""
    device = _device(net)
    net.eval()
    net.zero_grad(set_to_none=True)
    n = 0
    for x, y in forget:
        loss = F.cross_entropy(net(x.to(device)), y.to(device), reduction="sum")
        loss.backward()
        n += len(y)
    grads = {name: (p.grad.detach().clone() / max(n, 1)) if p.grad is not None else torch.zeros_like(p)
             for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return grads


@torch.no_grad()
def add_weight_noise(net: torch.nn.Module, sigma: float) -> None:
    """w += sigma * std(w) * N(0, 1) for every parameter tensor, in place (torch's global generator on the
    parameter's device; std over the tensor, 1 for a tensor of one element)."""
    for p in net.parameters():
        scale = p.std() if p.numel() > 1 else torch.ones((), device=p.device)
        p.add_(sigma * scale * torch.randn(p.shape, device=p.device))


def _reset_module(m: torch.nn.Module) -> None:
    """Re-initialise one module's own parameters with its default initialiser (torch's global generator)."""
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()


def reinitialise(net: torch.nn.Module) -> None:
    """Every layer re-initialised with its default initialiser (torch's global generator), the ResNet stem
    as farm.train.models initialises it."""
    for m in net.modules():
        _reset_module(m)
    # keep the same initialiser for a ResNet stem as farm.train.models uses
    conv1 = getattr(net, "conv1", None)
    if isinstance(conv1, torch.nn.Conv2d) and hasattr(net, "fc"):
        torch.nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")


# ------------------------------------------------------------------------------------------- built-ins

def finetune(net, retain, forget, validation, *, lr: float = 0.01, epochs: int = 2, momentum: float = 0.9,
             weight_decay: float = 5e-4):
    """Fine-tune on the retain set only, with SGD and a cosine schedule (the challenge's starting-kit
    baseline): forgetting comes only from catastrophic forgetting of examples no longer seen."""
    return _train_on(net, retain, epochs, lr, momentum, weight_decay)


def neggrad_plus(net, retain, forget, validation, *, lr: float = 0.01, epochs: int = 2, alpha: float = 0.95,
                 momentum: float = 0.9, weight_decay: float = 5e-4):
    """NegGrad+: per step, loss = alpha * CE(retain batch) - (1 - alpha) * CE(forget batch), i.e. gradient
    descent on retain mixed with gradient ascent on forget; one epoch is one pass over the retain set."""
    device = _device(net)
    opt = _sgd(net, lr, momentum, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(retain)))
    fgt = _cycle(forget)
    net.train()
    for _ in range(epochs):
        for x, y in retain:
            xf, yf = next(fgt)
            opt.zero_grad(set_to_none=True)
            loss = alpha * F.cross_entropy(net(x.to(device)), y.to(device)) \
                - (1 - alpha) * F.cross_entropy(net(xf.to(device)), yf.to(device))
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net


def _relabel_on_retain(net, retain, forget, *, lr, epochs, momentum, weight_decay, forget_weight=1.0, mask=None):
    """The loop random_label and salun share: each retain batch is paired with a forget batch whose labels
    are replaced by random wrong ones; loss = CE(retain) + forget_weight * CE(forget, random label).
    With a mask, only the masked weights move (their gradients are zeroed elsewhere)."""
    device = _device(net)
    n_classes = count_classes(net, retain)
    opt = _sgd(net, lr, momentum, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(retain)))
    fgt = _cycle(forget)
    net.train()
    for _ in range(epochs):
        for x, y in retain:
            xf, yf = next(fgt)
            yr = _random_other_labels(yf.to(device), n_classes)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x.to(device)), y.to(device)) \
                + forget_weight * F.cross_entropy(net(xf.to(device)), yr)
            loss.backward()
            if mask is not None:
                _apply_mask(net, mask)
            opt.step()
            sched.step()
    net.eval()
    return net


def random_label(net, retain, forget, validation, *, lr: float = 0.01, epochs: int = 2,
                 forget_weight: float = 1.0, momentum: float = 0.9, weight_decay: float = 5e-4):
    """Random relabelling: train on forget examples with a random wrong label (fresh each step) while
    also descending on retain batches: loss = CE(retain) + forget_weight * CE(forget, random label)."""
    return _relabel_on_retain(net, retain, forget, lr=lr, epochs=epochs, momentum=momentum,
                              weight_decay=weight_decay, forget_weight=forget_weight)


def _kl(student_logits, teacher_logits, t):
    """KL(teacher || student) on temperature-t softmaxes, scaled by t^2 (distillation convention)."""
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def scrub(net, retain, forget, validation, *, lr: float = 0.005, epochs: int = 3, max_epochs: int = 1,
          alpha: float = 1.0, gamma: float = 1.0, temperature: float = 4.0, momentum: float = 0.9,
          weight_decay: float = 5e-4):
    """SCRUB: the original is a frozen teacher, the student starts as a copy of it. For `epochs` epochs:
    while epoch < max_epochs, a max step over the forget set (ascend KL(teacher || student)); then a min
    step over the retain set (descend alpha * KL(teacher || student) + gamma * CE)."""
    device = _device(net)
    teacher = copy.deepcopy(net).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = _sgd(net, lr, momentum, weight_decay)
    for epoch in range(epochs):
        net.train()
        if epoch < max_epochs:
            for x, _ in forget:
                x = x.to(device)
                with torch.no_grad():
                    tl = teacher(x)
                opt.zero_grad(set_to_none=True)
                (-_kl(net(x), tl, temperature)).backward()
                opt.step()
        for x, y in retain:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                tl = teacher(x)
            opt.zero_grad(set_to_none=True)
            out = net(x)
            (alpha * _kl(out, tl, temperature) + gamma * F.cross_entropy(out, y)).backward()
            opt.step()
    net.eval()
    return net


def salun(net, retain, forget, validation, *, lr: float = 0.01, epochs: int = 2, mask_fraction: float = 0.5,
          momentum: float = 0.9, weight_decay: float = 5e-4):
    """SalUn-style saliency-masked random labels: the weight saliency |d CE(forget) / d w| selects the
    top mask_fraction of all weights (one global threshold); then random relabelling of forget plus CE on
    retain, updating only the salient weights."""
    return _relabel_on_retain(net, retain, forget, lr=lr, epochs=epochs, momentum=momentum,
                              weight_decay=weight_decay, mask=saliency_mask(net, forget, mask_fraction))


def saliency_mask(net: torch.nn.Module, forget, mask_fraction: float) -> dict[str, torch.Tensor]:
    """salun's mask: parameter name -> 0/1 tensor, 1 on the top mask_fraction of all weights by |d CE(forget)
    / d w| (one global threshold)."""
    grads = _forget_grads(net, forget)
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    k = max(1, int(round(mask_fraction * flat.numel())))
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    return {name: (g.abs() >= threshold).to(g.dtype) for name, g in grads.items()}


def erase_repair(net, retain, forget, validation, *, layers: int = 1, lr: float = 0.02, epochs: int = 3,
                 momentum: float = 0.9, weight_decay: float = 5e-4):
    """Erase then repair: rank the layers (modules that own parameters) by forget sensitivity, the mean
    |d CE(forget) / d w| over the layer's weights relative to the mean |w|, re-initialise the `layers`
    most sensitive ones, then repair by fine-tuning the whole net on the retain set."""
    erase_most_sensitive(net, forget, layers)
    return _train_on(net, retain, epochs, lr, momentum, weight_decay)


def erase_most_sensitive(net: torch.nn.Module, forget, layers: int) -> None:
    """erase_repair's erase step, in place: the `layers` layers of highest forget sensitivity
    (sum |d CE(forget) / d w| / sum |w| over a layer's own parameters) re-initialised."""
    grads = _forget_grads(net, forget)
    params = dict(net.named_parameters())
    scores = []
    for mname, m in net.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if not own or not hasattr(m, "reset_parameters"):
            continue
        full = [f"{mname}.{n}" if mname else n for n in own]
        g = sum(grads[f].abs().sum().item() for f in full)
        w = sum(params[f].detach().abs().sum().item() for f in full)
        scores.append((g / max(w, 1e-12), mname, m))
    scores.sort(key=lambda s: (-s[0], s[1]))
    for _, _, m in scores[:layers]:
        _reset_module(m)


def noise_finetune(net, retain, forget, validation, *, sigma: float = 0.3, lr: float = 0.01, epochs: int = 2,
                   momentum: float = 0.9, weight_decay: float = 5e-4):
    """Gaussian weight noise then fine-tune: w += sigma * std(w) * N(0, 1) for every parameter tensor
    (std over the tensor; 1 for tensors of one element), then fine-tune on the retain set."""
    add_weight_noise(net, sigma)
    return _train_on(net, retain, epochs, lr, momentum, weight_decay)


def retrain(net, retain, forget, validation, *, lr: float = 0.05, epochs: int = 10, momentum: float = 0.9,
            weight_decay: float = 5e-4):
    """The reference point: re-initialise every layer and train on the retain set from scratch (set lr and
    epochs to the spec's training to reproduce the run's retrain models' procedure)."""
    reinitialise(net)
    return _train_on(net, retain, epochs, lr, momentum, weight_decay)


def _common(lr, lr_grid, epochs, epochs_grid, epochs_high=50):
    return {
        "lr": Param("lr", "float", lr, 1e-5, 1.0, log=True, grid=lr_grid, help="SGD learning rate"),
        "epochs": Param("epochs", "int", epochs, 0, epochs_high, grid=epochs_grid, help="passes over retain"),
        "momentum": Param("momentum", "float", 0.9, 0.0, 0.99, help="SGD momentum"),
        "weight_decay": Param("weight_decay", "float", 5e-4, 0.0, 0.1, help="SGD weight decay"),
    }


def _space(*params: Param, base: dict | None = None) -> dict:
    out = dict(base or {})
    for p in params:
        out[p.name] = p
    return out


METHODS: dict[str, Method] = {
    "finetune": Method(
        "finetune", finetune, _common(0.01, (0.003, 0.01, 0.03, 0.1), 2, (1, 2, 4)),
        "Triantafillou et al., NeurIPS 2023 Machine Unlearning Challenge starting kit (fine-tune on retain)"),
    "neggrad_plus": Method(
        "neggrad_plus", neggrad_plus,
        _space(Param("alpha", "float", 0.95, 0.0, 1.0, grid=(0.9, 0.95, 0.99), help="retain weight"),
               base=_common(0.01, (0.003, 0.01, 0.03), 2, (1, 2))),
        "Kurmanji et al., 'Towards Unbounded Machine Unlearning', NeurIPS 2023 (NegGrad+ baseline)"),
    "random_label": Method(
        "random_label", random_label,
        _space(Param("forget_weight", "float", 1.0, 0.0, 10.0, grid=(0.5, 1.0), help="weight of the forget loss"),
               base=_common(0.01, (0.003, 0.01, 0.03), 2, (1, 2))),
        "Graves et al., 'Amnesiac Machine Learning', AAAI 2021 (random relabelling of the forget set)"),
    "scrub": Method(
        "scrub", scrub,
        _space(Param("max_epochs", "int", 1, 0, 50, grid=(1, 2), help="epochs with a max step on forget"),
               Param("alpha", "float", 1.0, 0.0, 10.0, help="weight of the retain KL"),
               Param("gamma", "float", 1.0, 0.0, 10.0, help="weight of the retain CE"),
               Param("temperature", "float", 4.0, 0.1, 20.0, help="distillation temperature"),
               base=_common(0.005, (0.001, 0.005, 0.02), 3, (2, 3))),
        "Kurmanji et al., 'Towards Unbounded Machine Unlearning', NeurIPS 2023 (SCRUB)"),
    "salun": Method(
        "salun", salun,
        _space(Param("mask_fraction", "float", 0.5, 0.0, 1.0, grid=(0.25, 0.5), help="share of salient weights"),
               base=_common(0.01, (0.003, 0.01, 0.03), 2, (1, 2))),
        "Fan et al., 'SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency', ICLR 2024"),
    "erase_repair": Method(
        "erase_repair", erase_repair,
        _space(Param("layers", "int", 1, 0, 1000, grid=(1, 2), help="how many most sensitive layers to reset"),
               base=_common(0.02, (0.01, 0.02, 0.05), 3, (2, 3, 5))),
        "re-initialise then repair, the family of most top entries of the NeurIPS 2023 challenge "
        "(Triantafillou et al., 'Are we making progress in unlearning?', 2024); cf. EU-k of Goel et al. 2022"),
    "noise_finetune": Method(
        "noise_finetune", noise_finetune,
        _space(Param("sigma", "float", 0.3, 0.0, 10.0, grid=(0.1, 0.3, 1.0), help="noise std per tensor std"),
               base=_common(0.01, (0.003, 0.01, 0.03), 2, (1, 2))),
        "Gaussian weight noise (Golatkar et al., 'Eternal Sunshine of the Spotless Net', CVPR 2020) then "
        "fine-tune, as in several NeurIPS 2023 challenge entries"),
    "retrain": Method(
        "retrain", retrain, _common(0.05, (0.05,), 10, (10,), epochs_high=1000),
        "the reference: retraining from scratch on the retain set (what perfect unlearning looks like)"),
}

# ------------------------------------------------------------------------------------------- user methods

_USER_REF = re.compile(r"^(?P<target>[^:]+):(?P<func>[A-Za-z_][A-Za-z0-9_]*)$")


def _load_file(path: str):
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise SpecError(f"unlearning method file {path!r} does not exist (looked at {full})")
    mod_name = "ufarm_user_" + hashlib.sha256(full.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise SpecError(f"unlearning method file {path!r} fails to import: {type(exc).__name__}: {exc}") from exc
    return module


def _user_space(fn, name: str) -> dict:
    raw = getattr(fn, "hparam_space", None)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"method {name!r}: hparam_space must be a mapping of name to {{type, default, ...}}")
    out = {}
    for pname, d in raw.items():
        if not isinstance(d, dict) or "default" not in d or d.get("type", "float") not in PARAM_TYPES:
            raise SpecError(f"method {name!r}: hparam_space.{pname} needs a type ({', '.join(PARAM_TYPES)}) "
                            f"and a default, got {d!r}")
        out[pname] = Param(pname, d.get("type", "float"), d["default"], d.get("low"), d.get("high"),
                           bool(d.get("log", False)), tuple(d.get("choices", ())), tuple(d.get("grid", ())),
                           d.get("help", ""))
    return out


@functools.lru_cache(maxsize=64)
def _user_method(name: str) -> Method:
    m = _USER_REF.match(name)
    if not m:
        raise SpecError(f"unlearning method {name!r} is unknown; built in: {', '.join(sorted(METHODS))}; "
                        "or give module.path:function or path/to/file.py:function")
    target, func = m["target"], m["func"]
    if is_file_ref(target):
        module = _load_file(target)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise SpecError(f"unlearning method {name!r}: cannot import {target!r}: "
                            f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise SpecError(f"unlearning method {name!r}: {target!r} has no function {func!r}")
    space = _user_space(fn, name)
    return Method(name, fn, space, source=f"user method {name}", open_space=not space)


def get_method(name: str) -> Method:
    """A built-in by name, or a user's method by `module.path:function` or `path/to/file.py:function`."""
    if name in METHODS:
        return METHODS[name]
    return _user_method(name)


def _summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line."""
    para = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


def describe_methods() -> dict:
    return {name: {"source": m.source, "doc": _summary(m.fn.__doc__),
                   "space": {k: p.describe() for k, p in m.space.items()}} for name, m in METHODS.items()}
