"""Unlearning methods with the NeurIPS 2023 challenge's signature:

    unlearn(net, retain, forget, validation, **hparams) -> net

where retain, forget and validation are torch DataLoaders of (image, label) batches. Each method declares
its hyper-parameters (name -> default) so specs can be checked before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .spec import SpecError


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    defaults: dict
    source: str

    def resolve(self, hparams: dict) -> dict:
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise SpecError(f"method {self.name!r} has no hyper-parameter(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(self.defaults)}")
        return {**self.defaults, **hparams}


def finetune(net, retain, forget, validation, *, lr: float = 0.01, epochs: int = 2, momentum: float = 0.9,
             weight_decay: float = 5e-4):
    """Fine-tune on the retain set only, with SGD and a cosine schedule (the challenge's starting-kit
    baseline): forgetting comes only from catastrophic forgetting of examples no longer seen."""
    device = next(net.parameters()).device
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(retain)))
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    for _ in range(epochs):
        for x, y in retain:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x.to(device)), y.to(device)).backward()
            opt.step()
            sched.step()
    net.eval()
    return net


METHODS: dict[str, Method] = {
    "finetune": Method("finetune", finetune, {"lr": 0.01, "epochs": 2, "momentum": 0.9, "weight_decay": 5e-4},
                       "Triantafillou et al., NeurIPS 2023 Machine Unlearning Challenge starting kit"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SpecError(f"unlearning method {name!r} is unknown; built in: {', '.join(sorted(METHODS))}")
    return METHODS[name]
