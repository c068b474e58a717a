#!/usr/bin/env python
r"""ResNet-18 (or the small CNN) on one GPU: P worker processes sharing the card (what `resources.gpus: 1/P`
gives under Ray) versus one, each training K models stacked in one network (`resources.batch_models: K`,
farm.train.stacked; K=1 is one model at a time), and, per setting, the GPU-seconds of one retrain and one
finetune of the cifar10-resnet18 preset and the GPU-hours of its 512 + 512 evaluation set, as ratios against
P=4 packing of one model at a time (the preset's setting) when that setting is measured in the same run.

Every process runs the engine's own code (farm.train.loops.train_model, predict_logits and the finetune
method through the competition's DataLoader signature) on a synthetic 32x32 CIFAR-shaped task (class
templates under noise, synthetic_task): the time of a training step does not depend on the pixel values, and
nothing is downloaded. Phases start together (a barrier); a phase's aggregate rate is P x K x images /
(last finish - first start). Each setting also prints its models' mean accuracy on held-out images of the
task, with the binomial standard error of those images (the spread between models comes on top): a setting
that trains wrongly falls towards chance, 0.1.

ResNet-18 stacks as grouped convolutions with BatchNorm per model (farm.train.stacked_resnet); every phase of
a stacked worker runs its K models at once (rates count K x images): the finetune phase through the method's
stacked twin (farm.train.stacked_methods), each model with its own farm.train.loops.make_loader loader; at K=1
the method itself, through the same batch-gathering loader. Finetunes run under the setting's precision,
as the engine runs a method whose hparams hold `precision` (the preset's finetunes: `precision: auto`).
With --arch small-cnn the same is measured for the fashion-mnist preset's CNN (28x28x1, batch 256).

Two more levers, measured rather than assumed: --memory-formats channels_last (the weights and the images in
NHWC, as `resources.memory_format: channels_last` gives; stacked ResNet-18s' network takes its models'
format, stacked small CNNs are skipped: their weights are plain tensors for farm.train.stacked_cnn's
kernels) and --compile on (the K=1 model compiled by torch.compile as `resources.compile: true` compiles it,
farm.train.loops.compiled, and used by every phase, the method's included; its compile time falls in an
untimed warm-up, printed as "compile+warm-up").

    python scripts/bench_packing.py                       # P = 1, 2, 4; fp32 and bf16 (a GPU)
    python scripts/bench_packing.py --procs 1 4 --stack 1 4 16 --precisions bf16   # packing x stacking
    python scripts/bench_packing.py --procs 1 --precisions bf16 fp32 --memory-formats contiguous channels_last \
        --compile off on --images 12288                  # the K=1 levers: memory format x torch.compile
    python scripts/bench_packing.py --procs 1 2 --stack 1 2 --images 256 --precisions fp32   # smoke test, CPU
    python scripts/bench_packing.py ... --budget-s 500     # end what runs past 500 s; the summary still prints
"""
from __future__ import annotations

import argparse
import itertools
import time
import traceback

import numpy as np

PHASES = ("train", "finetune", "predict")
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
TEST_IMAGES = 2048  # held-out images of the synthetic task per process, for the accuracy check
AMPLITUDE = 0.3  # of the synthetic task's class templates against the noise


SHAPES = {"resnet18": dict(channels=3, size=32, batch=128, augment=True, width=16),
          "small-cnn": dict(channels=1, size=28, batch=256, augment=False, width=32)}


def worker(rank: int, arch: str, n: int, precision: str, stack: int, memory_format: str, compile_: str,
           barrier, queue) -> None:
    try:
        queue.put(run_worker(rank, arch, n, precision, stack, memory_format, compile_, barrier))
    except Exception as exc:  # reported to measure(), which waits for one message per worker, and not hung on
        traceback.print_exc()
        queue.put(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        barrier.abort()  # the other workers stop waiting at their next phase


def synthetic_task(n: int, shape: dict, gen):
    """n CIFAR-shaped (or Fashion-MNIST-shaped) images of a learnable 10-class task: image = AMPLITUDE x its
    class's template (a random 4x4 pattern per channel, smoothly upsampled) + (1 - AMPLITUDE) x uniform
    noise; the templates are the same in every process (seed 0), the noise and labels come from gen. A
    step's time does not depend on the pixels; the task only makes accuracy mean something (chance is
    0.1), so a setting that trains wrongly shows."""
    import torch

    size = (shape["channels"], shape["size"], shape["size"])
    coarse = torch.rand(10, shape["channels"], 4, 4, generator=torch.Generator().manual_seed(0))
    templates = torch.nn.functional.interpolate(coarse, size=size[1:], mode="bilinear", align_corners=False)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return AMPLITUDE * templates[labels] + (1 - AMPLITUDE) * torch.rand(n, *size, generator=gen), labels


def run_worker(rank: int, arch: str, n: int, precision: str, stack: int, memory_format: str, compile_: str,
               barrier) -> tuple[dict, float, list[int]]:
    import torch

    from farm.train.methods import get_method
    from farm.train.models import build_model
    from farm.spec import ModelSpec, TrainingSpec
    from farm.train.loops import (compiled, configure_gpu_kernels, in_memory_format, make_loader,
                                  method_autocast, predict_logits, train_model)
    from farm.train.stacked import StackedModels, predict_stacked_chunks, train_stacked
    from farm.train.stacked_methods import STACKED_METHODS

    torch.set_num_threads(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_gpu_kernels(device)  # as farm.train.engine.Engine runs
    gen = torch.Generator().manual_seed(rank)
    shape = SHAPES[arch]
    images, labels = synthetic_task(n, shape, gen)
    images, labels = images.to(device), labels.to(device)
    test_images, test_labels = synthetic_task(TEST_IMAGES, shape, torch.Generator().manual_seed(10_000 + rank))
    test_images = test_images.to(device)
    cfg = TrainingSpec(epochs=1, batch_size=shape["batch"], lr=0.1, augment=shape["augment"], eval_batch_size=2048,
                       precision=precision)
    torch.manual_seed(rank)
    # as the engine makes them under resources.memory_format: the weights and the images every phase reads
    # its batches from (a stacked ResNet-18's StackedNet takes its models' format; stacked small CNNs' weights
    # stay plain tensors for farm.train.stacked_cnn's kernels)
    models = [in_memory_format(build_model(ModelSpec(arch=arch, width=shape["width"]), shape["channels"], 10,
                                           shape["size"]).to(device), memory_format) for _ in range(stack)]
    images = in_memory_format(images, memory_format)
    stacked = StackedModels(models) if stack > 1 else None
    model = compiled(models[0], compile_ == "on")  # in place, as the engine compiles its models
    gens = [torch.Generator().manual_seed(rank * 1000 + k) for k in range(stack)]
    finetune = get_method("finetune").fn
    stacked_finetune = STACKED_METHODS["finetune"].run
    queries = ("plain", "hflip")

    def run(phase: str, count: int) -> None:
        idx = np.arange(count)
        if phase == "train" and stacked is not None:
            train_stacked(stacked, images, labels, [idx] * stack, cfg, gens)
        elif phase == "train":
            train_model(model, images, labels, idx, cfg, gen)
        elif phase == "finetune" and stacked is not None:  # the method's stacked twin, each model its loader
            loaders = [make_loader(images, labels, idx, cfg.batch_size, True, rank * 1000 + k) for k in range(stack)]
            with method_autocast(device, precision):
                stacked_finetune(stacked, loaders, None, None, [{}] * stack, lr=0.01, epochs=1, momentum=0.9,
                                 weight_decay=5e-4)
        elif phase == "finetune":
            with method_autocast(device, precision):
                finetune(model, make_loader(images, labels, idx, cfg.batch_size, True, rank), None, None, lr=0.01,
                         epochs=1)
        elif stacked is not None:
            predict_stacked_chunks(stacked, images[:count], queries, max(1, cfg.eval_batch_size // stack), precision)
        else:
            predict_logits(model, images[:count], queries, cfg.eval_batch_size, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up: kernels chosen, allocator grown. A compiled module compiles a graph for a new batch shape (the
    # last partial batch, the last predict chunk), so it warms up on all n: no compiling in a timed phase
    t0 = time.time()
    for phase in PHASES:
        run(phase, n if compile_ == "on" else min(n, 512))
    warm_s = time.time() - t0
    times = {}
    for phase in PHASES:
        barrier.wait()
        t0 = time.time()
        run(phase, n)
        times[phase] = (t0, time.time())
    # every model's accuracy on held-out images of the task, after the warm-up's and the timed passes
    if stacked is not None:
        logits = torch.from_numpy(predict_stacked_chunks(stacked, test_images, ("plain",), 512, precision))[:, :, 0]
    else:
        logits = torch.from_numpy(predict_logits(model, test_images, ("plain",), 512, precision))[None, :, 0]
    correct = (logits.argmax(-1) == test_labels[None]).sum(1).tolist()
    return times, warm_s, correct


def measure(arch: str, procs: int, n: int, precision: str, stack: int = 1, memory_format: str = "contiguous",
            compile_: str = "off", timeout: float | None = None) -> tuple[dict[str, float], float, float]:
    """Aggregate images per second per phase for `procs` processes sharing the device, each training `stack`
    models at once (every phase counts every model's images), the slowest worker's warm-up seconds, and the
    models' mean accuracy on held-out images of the synthetic task. Workers still running after `timeout`
    seconds are ended (SystemExit)."""
    import queue as queues

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(r, arch, n, precision, stack, memory_format, compile_, barrier, queue))
          for r in range(procs)]
    for p in ps:
        p.start()
    end = None if timeout is None else time.monotonic() + timeout
    try:
        results = [queue.get(timeout=None if end is None else max(0.0, end - time.monotonic())) for _ in ps]
    except queues.Empty:
        for p in ps:
            p.kill()
            p.join()
        raise SystemExit(f"still running after the {timeout:.0f} s left of --budget-s; ended") from None
    for p in ps:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a worker exited with {p.exitcode}")
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise SystemExit(errors[0])  # the first to fail; the others only saw the barrier broken
    rates = {ph: procs * stack * n / (max(r[ph][1] for r, _, _ in results) - min(r[ph][0] for r, _, _ in results))
             for ph in PHASES}
    correct = [c for _, _, cs in results for c in cs]
    return rates, max(w for _, w, _ in results), sum(correct) / (len(correct) * TEST_IMAGES)


def label(key: tuple) -> str:
    precision, p, k, memory_format, compile_ = key
    return f"{precision} P={p} K={k} {memory_format} compile={compile_}"


def set_sizing(rates: dict, epochs: int, epochs_u: int, retain: int, predicted: int, n_retrain: int,
               n_unlearned: int) -> dict[tuple, tuple[float, float, float]]:
    """Per setting, the GPU-seconds of one retrain and one unlearned model and the GPU-hours of the set:

        predict_s = predicted / rate_predict          (every image the store holds, under 2 queries)
        retrain_s = epochs * retain / rate_train + predict_s
        unlearn_s = epochs_u * retain / rate_finetune + predict_s
        hours     = (n_retrain * retrain_s + n_unlearned * unlearn_s) / 3600

    `rates` maps a setting to its images per second per phase summed over every process and stacked model on
    the card (measure()), so images / rate is one model's share of the card's seconds."""
    sizing = {}
    for key, r in rates.items():
        predict_s = predicted / r["predict"]
        retrain_s = epochs * retain / r["train"] + predict_s
        unlearn_s = epochs_u * retain / r["finetune"] + predict_s
        sizing[key] = (retrain_s, unlearn_s, (n_retrain * retrain_s + n_unlearned * unlearn_s) / 3600)
    return sizing


def cheapest_set(sizing: dict, precision: str, n_retrain: int, n_unlearned: int):
    """The cheapest set in one precision when retrains and unlearned models each run at their own cheapest
    setting (the fewest GPU-seconds per model, predictions included, not the highest training rate):
    (retrain setting, unlearning setting, retrain_s, unlearn_s, hours), or None if no setting has it."""
    mine = [key for key in sizing if key[0] == precision]
    if not mine:
        return None
    best_retrain = min(mine, key=lambda key: sizing[key][0])
    best_unlearn = min(mine, key=lambda key: sizing[key][1])
    retrain_s, unlearn_s = sizing[best_retrain][0], sizing[best_unlearn][1]
    hours = (n_retrain * retrain_s + n_unlearned * unlearn_s) / 3600
    return best_retrain, best_unlearn, retrain_s, unlearn_s, hours


def preset_resources(key: tuple) -> dict:
    """The `resources` fields that run a setting under Ray: P processes per card is `gpus: 1/P`, K stacked
    models `batch_models: K`."""
    _, p, k, memory_format, compile_ = key
    return {"gpus": 1 / p, "batch_models": k, "memory_format": memory_format, "compile": compile_ == "on"}


def main() -> None:
    import torch

    from farm.spec import load_spec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--images", type=int, default=25_600, help="images per process per phase")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--arch", choices=sorted(SHAPES), default="resnet18")
    ap.add_argument("--stack", type=int, nargs="+", default=[1], help="models stacked per process (K)")
    ap.add_argument("--memory-formats", nargs="+", choices=["contiguous", "channels_last"], default=["contiguous"])
    ap.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"],
                    help="torch.compile the model (K=1 only)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all settings: a setting still running then is ended and the rest skipped, "
                         "so the summary always prints (one device call)")
    args = ap.parse_args()
    start = time.monotonic()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)"
    print(f"device: {device}, torch {torch.__version__}; {args.arch}, batch {SHAPES[args.arch]['batch']}, "
          f"{args.images} images per process")
    rates = {}
    settings = list(itertools.product(args.precisions, args.procs, args.stack, args.memory_formats, args.compile))
    # P=4 packing of one model at a time, the baseline of the ratios, first: a budget that runs out leaves it
    settings.sort(key=lambda key: key[1:] != (4, 1, "contiguous", "off"))
    for key in settings:
        precision, p, k, memory_format, compile_ = key
        name = f"{label(key):<42}"
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
        if left is not None and left <= 0:
            print(f"  {name}: skipped (--budget-s {args.budget_s:g} spent)", flush=True)
            continue
        if k > 1 and compile_ == "on":
            print(f"  {name}: skipped (torch.compile is measured for one model at a time, K=1)", flush=True)
            continue
        if k > 1 and memory_format == "channels_last" and args.arch == "small-cnn":
            print(f"  {name}: skipped (stacked small CNNs run farm.train.stacked_cnn's kernels on plain weight "
                  f"tensors, no module to convert)", flush=True)
            continue
        try:
            r, warm_s, acc = measure(args.arch, p, args.images, precision, k, memory_format, compile_, left)
        except SystemExit as exc:  # e.g. out of memory at a large K: the other settings still count
            print(f"  {name}: failed ({exc})", flush=True)
            continue
        rates[key] = r
        compiled = f" | compile+warm-up {warm_s:.1f} s" if compile_ == "on" else ""
        se = (acc * (1 - acc) / (p * k * TEST_IMAGES)) ** 0.5
        print(f"  {name}: train {r['train']:8.0f} img/s | finetune {r['finetune']:8.0f} img/s | "
              f"predict x2 queries {r['predict']:8.0f} img/s | test accuracy {acc:.3f} +- {se:.3f}{compiled}",
              flush=True)
    if not rates:  # every setting failed or was skipped
        return
    base, *others = rates
    print(f"  train rate vs {label(base)}:")
    for key in others:
        print(f"    {label(key):<42} {rates[key]['train'] / rates[base]['train']:.2f}x")

    if args.arch != "resnet18":
        # the fashion-mnist preset's shadow: 5 epochs on 30,000 images, then predicting 70,000 (x2 queries)
        per_model = {key: 5 * 30_000 / r["train"] + 70_000 / r["predict"] for key, r in rates.items()}
        key, best = min(per_model.items(), key=lambda kv: kv[1])
        print(f"  one fashion-mnist shadow (5 epochs x 30,000 + predicting 70,000): {best:.3f} GPU-s at the best "
              f"setting measured ({label(key)})")
        return
    # GPU-seconds of one retrain and one unlearned model of the cifar10-resnet18 preset at every setting, the
    # GPU-hours of its 512 + 512 evaluation set, and their ratio to P=4 packing of one model at a time (the
    # preset's setting until measured otherwise) in the same run
    spec = load_spec("cifar10-resnet18")
    retain = int(CIFAR_TRAIN * (1 - spec.forget.fraction))
    method = spec.unlearn[0]
    epochs_u = method.hparams.get("epochs", 1)
    n_retrain, n_unlearned = spec.count("retrain"), method.count
    print(f"  sizing: retrain = {spec.training.epochs} epochs x {retain} images + predicting "
          f"{CIFAR_TRAIN + CIFAR_TEST} x 2 queries; {method.method} = {epochs_u} epochs x {retain} + the same "
          f"predictions, both in each row's precision; the set = {n_retrain} + {n_unlearned} models")
    sizing = set_sizing(rates, spec.training.epochs, epochs_u, retain, CIFAR_TRAIN + CIFAR_TEST, n_retrain,
                        n_unlearned)
    for key, (retrain_s, unlearn_s, hours) in sizing.items():
        packed = (key[0], 4, 1, "contiguous", "off")
        ratio = (f" | speed-up over {label(packed)}: retrain {sizing[packed][0] / retrain_s:.2f}x, {method.method} "
                 f"{sizing[packed][1] / unlearn_s:.2f}x, set {sizing[packed][2] / hours:.2f}x"
                 if packed in sizing and packed != key else "")
        print(f"    {label(key):<42} retrain {retrain_s:7.1f} GPU-s | {method.method} {unlearn_s:6.1f} GPU-s | "
              f"set {hours:6.2f} GPU-hours{ratio}")
    for precision in args.precisions:  # the cheapest set per precision, each kind of model at its own best
        best = cheapest_set(sizing, precision, n_retrain, n_unlearned)
        if best is None:
            continue
        best_retrain, best_unlearn, retrain_s, unlearn_s, hours = best
        packed = (precision, 4, 1, "contiguous", "off")
        ratio = f" ({sizing[packed][2] / hours:.2f}x fewer than {label(packed)})" if packed in sizing else ""
        print(f"  sizing ({precision}, retrains at {label(best_retrain)}, {method.method} at {label(best_unlearn)}): "
              f"one retrain {retrain_s:.1f} GPU-s; one {method.method} ({epochs_u} epochs) {unlearn_s:.1f} GPU-s; "
              f"{n_retrain} + {n_unlearned} models: {hours:.2f} GPU-hours{ratio}")
        # a spec has one resources section for all its models: the preset takes the cheapest single setting
        single = min((key for key in sizing if key[0] == precision), key=lambda key: sizing[key][2])
        print(f"  one setting for the whole set ({precision}): {label(single)}, {sizing[single][2]:.2f} GPU-hours; "
              f"as the preset's resources: {preset_resources(single)}")


if __name__ == "__main__":
    main()
