#!/usr/bin/env python
"""One stacked training step of the preset's CNN (K models x batch B on 28x28 inputs), and one stacked
prediction chunk, in several variants, to choose how farm.train.stacked runs: the layouts of farm.train.stacked_cnn
(batched products, grouped convolutions, Triton kernels) and generic vmap, fp32 versus bf16 autocast,
deterministic cuDNN kernels versus autotuned ones. Prints ms per training step, model-steps per second,
the arithmetic rate reached (3 x the forward FLOPs, counted from the layer shapes), and ms per 1,000
image-model predictions. Every variant starts from the same weights and batch, and prints how far its
first loss and gradients lie from the first variant's in the same precision: a check that the kernels
compute the same thing on this device. On CPU-2 at --k 4 --b 32, float32 layouts lay ~1e-6 apart; in
bf16, where layouts round at different places, grouped convolutions lay 5e-3 from batched products and
vmap 1e-1. (At --k 2 --b 2 --width 4, Triton kernels with the backward pass's taps left unflipped lay 0.92
from grouped convolutions in float32.)
With --profile, the fastest variant's costliest operators; with --compile, every variant under
torch.compile (its compile time shows in the first step's time: the first forward and backward).

    python scripts/bench_stacked_step.py             # K=256, B=256 (a GPU)
    python scripts/bench_stacked_step.py --k 4 --b 32 --steps 2 --predict-images 64   # smoke test on a CPU
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import torch.nn.functional as F


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """Multiply-adds x 2 of one forward pass on a [1, C, size, size] input, from the conv and linear shapes."""
    flops, hooks = [0], []

    def conv_hook(mod, inp, out):
        flops[0] += 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    def linear_hook(mod, inp, out):
        flops[0] += 2 * out.numel() * mod.in_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(torch.zeros(1, model.features[0].in_channels, size, size))
    for h in hooks:
        h.remove()
    return flops[0]


def main() -> None:
    from farm.train.stacked import PREDICT_PAIRS, StackedModels
    from farm.train.models import build_model
    from farm.spec import ModelSpec
    from farm.train.loops import autocast

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--b", type=int, default=256)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--predict-images", type=int, default=None,
                    help="images per prediction chunk (default: farm.train.stacked's chunk for K models)")
    ap.add_argument("--profile", action="store_true", help="kernel table of the fastest variant")
    ap.add_argument("--layouts", nargs="+", default=["bmm", "grouped", "triton", "vmap"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--kernels", nargs="+", default=["deterministic", "autotuned"])
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the forward pass and loss (the first step's time includes compiling)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    spec = ModelSpec(arch="small-cnn", width=args.width)
    per_model = forward_flops(build_model(spec, 1, 10, 28), 28)
    print(f"K={args.k} models x B={args.b} images of 28x28; forward {per_model / 1e6:.1f} MFLOP per image")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.k, args.b, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.k, args.b), generator=gen).to(device)
    rows = []
    references = {}  # per precision, the first variant's first loss and gradients
    predict_x = torch.rand(args.predict_images or max(1, PREDICT_PAIRS // args.k), 1, 28, 28, generator=gen).to(device)
    variants = itertools.product(args.layouts, args.precisions, args.kernels)
    for impl, precision, kernels in variants:
        if device.type == "cpu" and kernels == "autotuned":
            continue  # the same code as another row on a CPU
        if device.type == "cpu" and impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            print(f"  {impl:<8} {precision:<5} {kernels:<13} skipped: Triton kernels need a GPU "
                  "(or TRITON_INTERPRET=1, slowly)")
            continue
        torch.use_deterministic_algorithms(kernels == "deterministic", warn_only=True)
        torch.backends.cudnn.benchmark = kernels == "autotuned"
        torch.manual_seed(0)
        stack = StackedModels([build_model(spec, 1, 10, 28).to(device) for _ in range(args.k)])
        stack.layout = impl
        opt = torch.optim.SGD(list(stack.params.values()), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def forward_loss(x, y, stack=stack):
            with autocast(device, precision):
                logits = stack.forward(x)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        if args.compile:  # torch.compile (inductor) of the forward pass and loss; backward through AOTAutograd
            forward_loss = torch.compile(forward_loss)

        def step(opt=opt, forward_loss=forward_loss):
            loss = forward_loss(images, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        try:
            t0 = time.perf_counter()  # the first forward and backward: compiling and autotuning included
            agreement = compare_first_gradients(stack, forward_loss, images, labels,
                                                references.setdefault(precision, {}),
                                                references.get("fp32") if precision != "fp32" else None)
            sync(device)
            first = time.perf_counter() - t0
            for _ in range(3):
                step()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            ms = (time.perf_counter() - t0) / args.steps * 1e3
            with torch.no_grad(), autocast(device, precision):
                stack.forward_shared(predict_x)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    stack.forward_shared(predict_x)
                sync(device)
            predict_ms = (time.perf_counter() - t0) / args.steps * 1e3 / (len(predict_x) * args.k) * 1e3
        except Exception as exc:  # a variant the backend cannot run: say so and go on
            print(f"  {impl:<10} {precision:<5} {kernels:<13} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if impl == "triton" and kernels == "autotuned":
            from farm.train.stacked_triton import chosen_tiles

            for kernel, tile in chosen_tiles().items():
                print(f"    autotuned tile {kernel}: {tile}")
        tflops = 3 * per_model * args.k * args.b / (ms / 1e3) / 1e12
        rows.append((impl, precision, kernels, ms, step))
        print(f"  {impl:<8} {precision:<5} {kernels:<13} {ms:8.2f} ms/step {args.k / ms * 1e3:8.0f} model-steps/s "
              f"{tflops:6.1f} TFLOP/s | predict {predict_ms:7.4f} ms per 1,000 pairs | first step {first:6.2f} s"
              f" | {agreement}", flush=True)
    if not rows:
        raise SystemExit("bench_stacked_step: every variant failed (see the lines above)")
    best = min(rows, key=lambda r: r[3])
    print(f"fastest: {best[0]} {best[1]} {best[2]}: {best[3]:.2f} ms/step; "
          f"one epoch of 30,000 examples at this batch: {best[3] * 30000 / args.b / 1e3:.2f} s for {args.k} models")
    if args.profile:
        profile(best, device)


def compare_first_gradients(stack, forward_loss, images, labels, reference: dict,
                            fp32_reference: dict | None = None) -> str:
    """The loss and gradients of one step from the variant's initial weights, against the first variant's
    in the same precision (kept in reference): |loss - loss_ref| / |loss_ref|, and per parameter tensor
    ||g - g_ref|| / ||g_ref|| (Euclidean norms), the worst of them shown with its name. fp32_reference:
    the first float32 variant's, when this one is not float32: how far the variant's rounding lies from
    float32's, so a layout's distance from the first can be set against the precision's own."""
    names = list(stack.params)
    loss = forward_loss(images, labels)
    grads = [g.float() for g in torch.autograd.grad(loss, list(stack.params.values()))]
    loss = loss.detach().float()
    norm = torch.linalg.vector_norm

    def distance(ref: dict) -> str:
        loss_diff = ((loss - ref["loss"]).abs() / ref["loss"].abs()).item()
        diffs = [(norm(g - r) / norm(r)).item() for g, r in zip(grads, ref["grads"])]
        worst = max(range(len(diffs)), key=lambda i: diffs[i] if diffs[i] == diffs[i] else float("inf"))  # NaN first
        return f"loss {loss_diff:.1e}, gradients {diffs[worst]:.1e} ({names[worst]})"

    if not reference:
        reference.update(loss=loss, grads=grads)
        text = "the gradient check's reference"
    else:
        text = "vs the first: " + distance(reference)
    if fp32_reference:
        text += " | vs the first fp32: " + distance(fp32_reference)
    return text


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile(best, device: torch.device) -> None:
    """The 25 operators with the most device time of their own in three steps of the fastest variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    impl, precision, kernels, _, step = best
    torch.use_deterministic_algorithms(kernels == "deterministic", warn_only=True)
    torch.backends.cudnn.benchmark = kernels == "autotuned"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {impl} {precision} {kernels}, 3 steps:")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
