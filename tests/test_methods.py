"""Unlearning methods: the built-ins, user methods by import path and file path, per-model errors, the
time marker, and the stability of the methods' order on a small digits store."""
from __future__ import annotations

import contextlib
import copy
import json
import os

import numpy as np
import pytest
import torch

from farm.spec import method_label
from farm.train.methods import METHODS, get_method
from farm.spec import SpecError, spec_from_dict

# small enough for seconds on 2 cores, trained enough (about 90% test accuracy) for stable scores
STORE_SPEC = {
    "name": "methods-test",
    "seed": 5,
    "dataset": {"name": "digits", "test_fraction": 0.2, "val_fraction": 0.5},
    "forget": {"kind": "random", "fraction": 0.1},
    "model": {"arch": "small-cnn", "width": 8},
    "training": {"epochs": 6, "batch_size": 64, "lr": 0.05},
    "counts": {"original": 2, "retrain": 6},
    "queries": ["plain"],
}
QUICK = {"finetune": {"epochs": 1}, "neggrad_plus": {"epochs": 1}, "random_label": {"epochs": 1},
         "scrub": {"epochs": 1}, "salun": {"epochs": 1}, "erase_repair": {"epochs": 1},
         "noise_finetune": {"epochs": 1}, "retrain": {"epochs": 1}}

BAD_METHODS = '''
import torch

def raises(net, retain, forget, validation, **hp):
    raise ValueError("boom from the user method")

def returns_none(net, retain, forget, validation, **hp):
    return None

def other_shape(net, retain, forget, validation, **hp):
    return torch.nn.Linear(3, 2)

def nan_out(net, retain, forget, validation, **hp):
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    return net
'''

USER_METHOD = '''
import torch
from torch.utils.data import DataLoader

CALLS = []

def unlearn(net, retain, forget, validation, lr=0.01):
    assert all(isinstance(x, DataLoader) for x in (retain, forget, validation))
    CALLS.append(lr)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for x, y in retain:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net
'''


def build_store(root) -> str:
    """The shared small store of both test modules (built once per session, then reused)."""
    from farm.run import prepare_run, run_local

    store = str(root / "methods-store")
    prep = prepare_run(spec_from_dict(STORE_SPEC), store)
    if prep.pending:
        run_local(prep, progress=False)
    return store


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    return build_store(tmp_path_factory.getbasetemp())


def run_unlearn(store: str, unlearn: list, **extra):
    from farm.run import prepare_run, run_local

    raw = {**copy.deepcopy(STORE_SPEC), "unlearn": unlearn, "max_retries": 0, **extra}
    prep = prepare_run(spec_from_dict(raw), store)
    return prep, run_local(prep, progress=False)


def loaders():
    from farm.data import load_dataset
    from farm.train.loops import make_loader

    spec = spec_from_dict(STORE_SPEC)
    ds = load_dataset(spec.dataset, spec.seed)
    x, y = torch.tensor(ds.images), torch.tensor(ds.labels.astype(np.int64))
    idx = np.arange(len(y))
    return (make_loader(x, y, idx[:300], 64, True, 1), make_loader(x, y, idx[300:360], 64, True, 2),
            make_loader(x, y, idx[360:420], 64, False, 3))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_builtin_returns_a_same_shape_model_deterministically(name):
    from farm.train.models import build_model

    spec = spec_from_dict(STORE_SPEC)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = build_model(spec.model, 1, 10, 8)
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        before = {k: v.clone() for k, v in net.state_dict().items()}
        torch.manual_seed(1)  # the engine seeds torch before calling the method
        out = METHODS[name].fn(net, *loaders(), **METHODS[name].resolve(QUICK[name]))
        assert isinstance(out, torch.nn.Module)
        assert {k: v.shape for k, v in out.state_dict().items()} == shapes
        assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items()), "nothing changed"
        assert all(torch.isfinite(v).all() for v in out.state_dict().values())
        outs.append(out.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0]), f"{name} is not deterministic"


def test_every_builtin_runs_in_the_engine_and_records_time(small_store):
    prep, res = run_unlearn(small_store, [{"method": m, "count": 1, "hparams": hp} for m, hp in QUICK.items()],
                            time_cutoff=1e-6)
    assert res.failed == {}
    markers = prep.store.markers()
    for m in METHODS:
        (mid,) = [k for k in markers if k.startswith(f"unlearned-{m}-")]
        mk = markers[mid]
        assert mk["retrain_seconds_mean"] > 0 and mk["time_ratio"] > 0
        assert mk["time_cutoff"] == 1e-6 and mk["over_time_cutoff"] is True
        assert 0 <= mk["accuracy"]["test"] <= 1


def test_hparams_are_checked_against_the_declared_space():
    with pytest.raises(SpecError, match=r"finetune.*lr must lie in"):
        get_method("finetune").resolve({"lr": -1})
    with pytest.raises(SpecError, match="has no hyper-parameter"):
        get_method("scrub").resolve({"nope": 1})
    with pytest.raises(SpecError, match="epochs must be an integer"):
        get_method("finetune").resolve({"epochs": 1.5})
    with pytest.raises(SpecError, match="unknown; built in"):
        get_method("no_such_method")
    with pytest.raises(SpecError, match="does not exist"):
        get_method("./no_such_file.py:unlearn")
    assert get_method("finetune").resolve({"lr": 0.1, "seed": 3})["lr"] == 0.1  # seed is the farm's, not passed on
    for name, m in METHODS.items():
        assert m.source and m.fn.__doc__, name
        for p in m.space.values():
            assert p.check(p.default, p.name) == p.default
            for g in p.grid:
                p.check(g, p.name)


def test_method_labels_are_file_name_safe():
    assert method_label("finetune") == "finetune"
    assert method_label("mypkg.mymodule:unlearn") == "mypkg.mymodule.unlearn"
    assert method_label("./sub/dir/my_method.py:unlearn") == "my_method.unlearn"
    assert method_label("/abs/path/x-y z.py:fn") == "x_y_z.fn"


def test_bad_methods_get_a_clear_error_per_model_and_the_run_goes_on(small_store, tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(BAD_METHODS)
    unlearn = [{"method": f"{path}:{fn}", "count": 1} for fn in ("raises", "returns_none", "other_shape", "nan_out")]
    unlearn.append({"method": "finetune", "count": 2, "hparams": {"epochs": 1, "lr": 0.02}})
    prep, res = run_unlearn(small_store, unlearn)
    assert len(res.failed) == 4
    finetune_ids = [j.model_id for j in prep.plan.jobs if j.method == "finetune"]
    assert all(m in prep.store.markers() for m in finetune_ids)
    expect = {"raises": "raised ValueError: boom from the user method", "returns_none": "returned NoneType",
              "other_shape": "another shape", "nan_out": "NaN"}
    failures = prep.store.failures()
    for fn, text in expect.items():
        (mid,) = [m for m in res.failed if f"bad.{fn}-" in m]
        assert text in res.failed[mid]
        assert mid in failures[mid]["error"], "the error message names the model"
        assert failures[mid]["traceback"]
    tb = failures[[m for m in res.failed if "bad.raises-" in m][0]]["traceback"]
    assert "boom from the user method" in tb and "in raises" in tb


def test_user_method_by_import_path_and_by_file_path(small_store, tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mymodule.py").write_text(USER_METHOD)
    (tmp_path / "my_method.py").write_text(USER_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    prep, res = run_unlearn(small_store, [
        {"method": "mypkg.mymodule:unlearn", "count": 1, "hparams": {"lr": 0.02}},
        {"method": "./my_method.py:unlearn", "count": 1},
    ])
    assert res.failed == {}
    ids = sorted(j.model_id for j in prep.plan.jobs if j.role == "unlearned")
    assert ids[0].startswith("unlearned-my_method.unlearn-") and ids[1].startswith("unlearned-mypkg.mymodule.unlearn-")
    for mid in ids:
        assert os.path.basename(prep.store.path(f"logits/{mid}.parquet")) == f"{mid}.parquet"
        assert mid in prep.store.markers()
    import mypkg.mymodule

    assert mypkg.mymodule.CALLS == [0.02]
    assert get_method("./my_method.py:unlearn").resolve({"anything": 1}) == {"anything": 1}


def test_best_and_worst_methods_are_stable_across_two_search_seeds(small_store):
    """Every built-in at its defaults (retrain with the run's own training), 4 models each, scored against
    the retrained reference; seed 1 makes new replicates of every method. The best and the worst method of
    one seed must be within a tolerance of the best and the worst of the other."""
    from farm.spec import spec_from_dict as load
    from farm.run.tune import parse_tune, prepare_setup, score_hparams, trial_hparams

    spec = load({**STORE_SPEC, "tune": {"method": "finetune", "models": 4, "params": {"lr": [0.01, 0.02]}}})
    ts = parse_tune(spec)
    setup = prepare_setup(spec, ts, small_store, local=True, progress=False)
    scores = {}
    for seed in (0, 1):
        for name, m in METHODS.items():
            hp = {"epochs": 6, "lr": 0.05} if name == "retrain" else {}
            setup.method = name
            scores[seed, name] = score_hparams(setup, trial_hparams(m, hp, {}, seed))["final_score"]
    tol = 0.1
    for a, b in ((0, 1), (1, 0)):
        row_a = {n: scores[a, n] for n in METHODS}
        row_b = {n: scores[b, n] for n in METHODS}
        best, worst = max(row_a, key=row_a.get), min(row_a, key=row_a.get)
        assert row_b[best] >= max(row_b.values()) - tol, (best, row_a, row_b)
        assert row_b[worst] <= min(row_b.values()) + tol, (worst, row_a, row_b)
    print(json.dumps({f"{s}:{n}": round(v, 3) for (s, n), v in scores.items()}))


def test_a_method_under_method_autocast_steps_as_with_autocast_around_its_forward_passes():
    """A whole method under method_autocast (its backward passes and optimiser steps too) gives the weights
    of the same loop with bf16 autocast around each forward pass and loss only, as training steps run; also
    when the method enters autocast itself per step (nested). Plain autocast around the whole loop does not:
    its weight cache keeps the first step's bf16 weights for every later forward pass."""
    from farm.spec import ModelSpec
    from farm.train.loops import method_autocast
    from farm.train.models import build_model

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 16, 1, 8, 8, generator=gen), torch.randint(0, 10, (4, 16), generator=gen)
    cpu = torch.device("cpu")

    def steps(outer, inner):
        torch.manual_seed(0)
        net = build_model(ModelSpec(arch="small-cnn", width=4), 1, 10, 8)
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        with outer():
            for xb, yb in zip(x, y):
                opt.zero_grad()
                with inner():
                    loss = torch.nn.functional.cross_entropy(net(xb).float(), yb)
                loss.backward()
                opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    plain = contextlib.nullcontext
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    whole = lambda: method_autocast(cpu, "bf16")  # noqa: E731
    per_step = steps(plain, bf16)
    assert torch.equal(steps(whole, plain), per_step)
    assert torch.equal(steps(whole, bf16), per_step)
    assert not torch.equal(steps(bf16, plain), per_step)
    assert not torch.equal(steps(plain, plain), per_step)  # bf16 made a difference
    assert torch.equal(steps(lambda: method_autocast(cpu, "fp32"), plain), steps(plain, plain))
