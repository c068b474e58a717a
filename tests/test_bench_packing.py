"""scripts/bench_packing.py's sizing, which turns the rates a lent GPU measures into the GPU-hours
docs/cluster.md quotes: checked against hand-computed figures, and the cheapest set picks each kind of
model's fewest GPU-seconds (predictions included), not its fastest training."""
from __future__ import annotations

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "bench_packing.py")
_SPEC = importlib.util.spec_from_file_location("bench_packing", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

FAST_TRAIN = ("bf16", 1, 8, "contiguous", "off")  # trains fastest, predicts slowly
BALANCED = ("bf16", 4, 1, "contiguous", "off")
RATES = {FAST_TRAIN: {"train": 1000.0, "finetune": 400.0, "predict": 100.0},
         BALANCED: {"train": 900.0, "finetune": 500.0, "predict": 1000.0},
         ("fp32", 1, 1, "contiguous", "off"): {"train": 10.0, "finetune": 10.0, "predict": 10.0}}


def test_set_sizing_matches_hand_computed_seconds_and_hours():
    sizing = bench.set_sizing(RATES, epochs=30, epochs_u=5, retain=900, predicted=600, n_retrain=512,
                              n_unlearned=512)
    # BALANCED: retrain 30 * 900 / 900 + 600 / 1000 = 30.6 s; unlearn 5 * 900 / 500 + 0.6 = 9.6 s
    assert sizing[BALANCED][:2] == pytest.approx((30.6, 9.6))
    assert sizing[BALANCED][2] == pytest.approx(512 * (30.6 + 9.6) / 3600)
    # FAST_TRAIN: retrain 27 + 6 = 33 s, unlearn 11.25 + 6 = 17.25 s
    assert sizing[FAST_TRAIN][:2] == pytest.approx((33.0, 17.25))


def test_the_cheapest_set_counts_predictions_and_keeps_to_its_precision():
    sizing = bench.set_sizing(RATES, 30, 5, 900, 600, 512, 256)
    retrain_at, unlearn_at, retrain_s, unlearn_s, hours = bench.cheapest_set(sizing, "bf16", 512, 256)
    assert (retrain_at, unlearn_at) == (BALANCED, BALANCED)  # not FAST_TRAIN, the highest training rate
    assert (retrain_s, unlearn_s) == pytest.approx((30.6, 9.6))
    assert hours == pytest.approx((512 * 30.6 + 256 * 9.6) / 3600)
    assert bench.cheapest_set(sizing, "fp16", 512, 256) is None


def test_the_cheapest_set_may_mix_settings():
    rates = dict(RATES)
    rates[FAST_TRAIN] = dict(RATES[FAST_TRAIN], predict=10_000.0)  # now also the cheapest retrain
    sizing = bench.set_sizing(rates, 30, 5, 900, 600, 512, 512)
    retrain_at, unlearn_at, retrain_s, unlearn_s, _ = bench.cheapest_set(sizing, "bf16", 512, 512)
    assert (retrain_at, unlearn_at) == (FAST_TRAIN, BALANCED)
    assert (retrain_s, unlearn_s) == pytest.approx((27.06, 9.6))


def test_a_setting_becomes_the_resources_that_run_it_and_they_load():
    from farm.spec import load_spec, spec_from_dict

    fields = bench.preset_resources(("bf16", 4, 8, "channels_last", "on"))
    assert fields == {"gpus": 0.25, "batch_models": 8, "memory_format": "channels_last", "compile": True}
    raw = load_spec("cifar10-resnet18").to_dict()
    raw["resources"].update(fields)
    resources = spec_from_dict(raw).resources
    assert (resources.gpus, resources.batch_models, resources.memory_format, resources.compile) == (
        0.25, 8, "channels_last", True)
