"""farm.train.stacked_methods: K unlearned models stepped together by a built-in's stacked twin end where
the built-in run on each model alone ends (weights, BatchNorm statistics, predictions), through the
engine and the scheduler too."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from farm.plan import Job
from farm.run import prepare_run, run_local
from farm.spec import ModelSpec, SpecError, spec_from_dict
from farm.store import RunStore
from farm.train.engine import Engine, MethodError
from farm.train.loops import make_loader, method_autocast
from farm.train.methods import get_method
from farm.train.models import build_model
from farm.train.stacked import StackedModels
from farm.train.stacked_methods import STACKED_METHODS, following_global, stack_key
from tests.conftest import TINY_SPEC
from tests.test_stacked_resnet import _assert_states_equal, _tiny_models

K = 3
HPARAMS = {"finetune": {}, "neggrad_plus": {"alpha": 0.7}, "random_label": {"forget_weight": 0.5},
           "noise_finetune": {"sigma": 0.2}, "erase_repair": {"layers": 2}, "retrain": {},
           "scrub": {"max_epochs": 1, "alpha": 0.5, "gamma": 2.0}, "salun": {"mask_fraction": 0.3}}
TOL = dict(rtol=1e-8, atol=1e-9)  # float64: differences are the kernels' summation order only
pytestmark = pytest.mark.usefixtures("one_thread")  # bit-comparable kernels



def _data(channels, size, n=42, n_classes=3):
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64)
    return images, torch.randint(0, n_classes, (n,), generator=gen)


def _loaders(images, labels, seed):
    """Model-seeded retain and forget loaders, as the engine makes them: 32 retain examples in whole batches
    of 8 (a pass that ends on a whole batch draws once more at its end, as DataLoader's sampler does), 10
    forget examples (a short last batch; the forget loader cycles)."""
    return (make_loader(images, labels, np.arange(32), 8, True, seed),
            make_loader(images, labels, np.arange(32, 42), 8, True, seed + 1))


def _one_at_a_time(name, models, images, labels, hparams):
    method = get_method(name)
    out = []
    for k, model in enumerate(models):
        torch.manual_seed(100 + k)  # what the engine's set_determinism does before a model's method
        retain, forget = _loaders(images, labels, 10 * k)
        out.append(method.fn(model, retain, forget, None, **hparams))
    return out


def _stacked(name, models, images, labels, hparams):
    twin = STACKED_METHODS[name]
    retains, forgets, gens, prepared = [], [], [], []
    for k, model in enumerate(models):
        torch.manual_seed(100 + k)
        retain, forget = _loaders(images, labels, 10 * k)
        prepared.append(twin.prepare(model, retain, forget, hparams) or {})
        gens.append(following_global(images.device))
        retains.append(retain)
        forgets.append(forget)
    stack = StackedModels(models)
    twin.run(stack, retains, forgets, gens, prepared, **hparams)
    return stack.unstack()


@pytest.mark.parametrize("name", sorted(STACKED_METHODS))
@pytest.mark.parametrize("arch", ["small-cnn", "batchnorm"])
def test_stacked_twin_ends_where_each_model_alone_ends(name, arch):
    """float64, 2 epochs: the weights and (for BatchNorm) running statistics after the stacked twin equal
    the built-in's on each model alone, and the method moved every model."""
    if arch == "batchnorm":
        make = lambda: _tiny_models(K, seed=4)  # noqa: E731
        images, labels = _data(3, 8)
    else:
        def make():
            torch.manual_seed(4)
            return [build_model(ModelSpec(width=4), 1, 3, 8).double() for _ in range(K)]
        images, labels = _data(1, 8)
    hparams = get_method(name).resolve({**HPARAMS[name], "epochs": 2, "lr": 0.05})
    start = make()
    alone = _one_at_a_time(name, make(), images, labels, hparams)
    together = _stacked(name, make(), images, labels, hparams)
    for k in range(K):
        _assert_states_equal(together[k].state_dict(), alone[k].state_dict(), **TOL)
        moved = [n for n, v in start[k].state_dict().items() if v.is_floating_point()
                 and not torch.allclose(v, alone[k].state_dict()[n])]
        assert len(moved) >= len(list(start[k].parameters())) // 2, moved
    with torch.no_grad():
        for a, b in zip(alone, together):
            torch.testing.assert_close(b.eval()(images), a.eval()(images), **TOL)


@pytest.mark.parametrize("name", sorted(STACKED_METHODS))
@pytest.mark.parametrize("arch", ["small-cnn", "batchnorm"])
def test_stacked_twin_under_bf16_ends_where_each_model_alone_ends(name, arch):
    """float32 under the engine's bf16 method autocast (hparams.precision: bf16), 1 epoch: the twin's
    models equal the built-in's on each model alone (one thread: bf16 products of the same operands), and
    bf16 changed them (against float32)."""
    if arch == "batchnorm":
        make = lambda: [m.float() for m in _tiny_models(K, seed=4)]  # noqa: E731
        images, labels = _data(3, 8)
    else:
        def make():
            torch.manual_seed(4)
            return [build_model(ModelSpec(width=4), 1, 3, 8) for _ in range(K)]
        images, labels = _data(1, 8)
    images = images.float()
    hparams = get_method(name).resolve({**HPARAMS[name], "epochs": 1, "lr": 0.05})
    cpu = torch.device("cpu")
    with method_autocast(cpu, "bf16"):
        alone = _one_at_a_time(name, make(), images, labels, hparams)
        together = _stacked(name, make(), images, labels, hparams)
    fp32 = _one_at_a_time(name, make(), images, labels, hparams)
    for k in range(K):
        _assert_states_equal(together[k].state_dict(), alone[k].state_dict(), rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(v, fp32[0].state_dict()[n]) for n, v in alone[0].state_dict().items())


def test_following_global_continues_the_global_generator():
    torch.manual_seed(7)
    torch.rand(5)
    gen = following_global(torch.device("cpu"))
    want = torch.randint(1, 10, (20,))
    assert torch.equal(torch.randint(1, 10, (20,), generator=gen), want)


def _user_method(folder) -> str:
    """A user's method (a file reference): it has no stacked twin."""
    path = folder / "keep.py"
    path.write_text("def unlearn(net, retain, forget, validation, epochs=1, lr=0.0):\n    return net\n")
    return f"{path}:unlearn"


def _unlearn_jobs(spec_dict, tmp_path, method, count=4, **hparams):
    d = copy.deepcopy(spec_dict)
    d["counts"] = {"original": 2}
    d["unlearn"] = [{"method": method, "count": count, "hparams": {"epochs": 2, "lr": 0.05, **hparams}}]
    spec = spec_from_dict(d)
    preps = [prepare_run(spec, str(tmp_path / name)) for name in ("alone", "stacked")]
    engines = [Engine(p.context(), threads=1) for p in preps]
    originals = [j for j in preps[0].plan.jobs if j.role == "original"]
    for engine in engines:  # the same originals in both stores, bit for bit (CPU, one thread)
        for job in originals:
            engine.run(job)
    return engines, [j for j in preps[0].plan.jobs if j.role == "unlearned"]


@pytest.mark.parametrize("method", ["random_label", "noise_finetune"])
def test_the_engine_stacks_unlearned_jobs_as_it_runs_them_alone(method, tmp_path):
    """Unlearned jobs of two originals through Engine.run one by one and Engine.run_batch as one stack
    (the methods that draw random numbers): the same logits up to float rounding, markers per model."""
    (alone, stacked), jobs = _unlearn_jobs(TINY_SPEC, tmp_path, method)
    assert len({j.parent for j in jobs}) == 2
    for job in jobs:
        alone.run(job)
    markers = stacked.run_batch(jobs)
    assert [m["batched"] for m in markers] == [len(jobs)] * len(jobs)
    assert all(m["role"] == "unlearned" and m["method"] == method for m in markers)
    a, b = RunStore(str(tmp_path / "alone")).read_conf(), RunStore(str(tmp_path / "stacked")).read_conf()
    assert a.model_ids == b.model_ids
    np.testing.assert_allclose(b.conf, a.conf, atol=2e-3, rtol=1e-3)
    assert np.array_equal(a.trained_on, b.trained_on)
    # the models differ from each other: each drew its own numbers
    rows = a.conf[[a.model_ids.index(j.model_id) for j in jobs]]
    assert len({r.tobytes() for r in rows}) == len(jobs)


def test_the_engine_stacks_resnet18_unlearning(tmp_path):
    """ResNet-18 (BatchNorm) finetunes of one original, alone and stacked, give the same logits."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 4, 80))
    raw = copy.deepcopy(TINY_SPEC)
    raw.update(model={"arch": "resnet18"}, queries=["plain"],
               dataset={"name": "arrays", "path": str(tmp_path / "d.npz"), "test_fraction": 0.25})
    raw["training"].update(epochs=1, batch_size=32)
    (alone, stacked), jobs = _unlearn_jobs(raw, tmp_path, "finetune", count=2, lr=0.01)
    for job in jobs:
        alone.run(job)
    assert [m["batched"] for m in stacked.run_batch(jobs)] == [2, 2]
    a, b = RunStore(str(tmp_path / "alone")).read_conf(), RunStore(str(tmp_path / "stacked")).read_conf()
    np.testing.assert_allclose(b.conf, a.conf, atol=2e-3, rtol=1e-3)


def test_what_does_not_stack_runs_alone(tmp_path):
    """A method without a twin (a user's), or a mix of methods or hyper-parameters, runs one model at a
    time."""
    (_, engine), jobs = _unlearn_jobs(TINY_SPEC, tmp_path, _user_method(tmp_path), count=2)
    assert stack_key(jobs[0]) is None
    assert [m["batched"] for m in engine.run_batch(jobs)] == [1, 1]
    other = Job("unlearned-finetune-x-00000", "unlearned", 0, 5, jobs[0].train_idx, parent=jobs[0].parent,
                method="finetune", hparams={"lr": 0.02})
    same = Job("unlearned-finetune-y-00001", "unlearned", 1, 6, jobs[0].train_idx, parent=jobs[0].parent,
               method="finetune", hparams={"lr": 0.01})
    assert stack_key(other) != stack_key(same) and stack_key(jobs[0]) != stack_key(same)
    assert stack_key(Job("shadow-00000", "shadow", 0, 1, jobs[0].train_idx)) == \
        stack_key(Job("retrain-00000", "retrain", 0, 1, jobs[0].train_idx))


def test_a_failing_stack_names_its_models(tmp_path, monkeypatch):
    (_, engine), jobs = _unlearn_jobs(TINY_SPEC, tmp_path, "finetune", count=2)

    def broken(stack, *args, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(STACKED_METHODS, "finetune", STACKED_METHODS["finetune"].__class__(broken))
    with pytest.raises(MethodError, match=f"models {jobs[0].model_id}, {jobs[1].model_id} \\(stacked\\): "
                                          "method 'finetune' raised RuntimeError: out of memory"):
        engine.run_batch(jobs)


def test_the_runner_batches_unlearned_models_of_one_method_and_hparams(tmp_path, monkeypatch):
    """Through the plain loop with batch_models 3: two methods of 4 models each, each stacked in batches of
    at most 3 models of one method; a stack that raises (neggrad_plus's, here) is retried one model at a
    time, through the method itself, and its models are made."""
    def broken(stack, *args, **kw):
        raise RuntimeError("a stacked twin's bug")

    monkeypatch.setitem(STACKED_METHODS, "neggrad_plus", STACKED_METHODS["neggrad_plus"].__class__(broken))
    d = copy.deepcopy(TINY_SPEC)
    d["counts"] = {"original": 1}
    d["unlearn"] = [{"method": "finetune", "count": 4, "hparams": {"epochs": 1}},
                    {"method": "neggrad_plus", "count": 4, "hparams": {"epochs": 1}},
                    {"method": _user_method(tmp_path), "count": 2, "hparams": {"epochs": 1}}]
    d["resources"] = {"batch_models": 3}
    result = run_local(prepare_run(spec_from_dict(d), str(tmp_path)), progress=False)
    assert not result.failed and len(result.trained) == 11
    markers = RunStore(str(tmp_path)).markers()
    for method, want in (("finetune", [1, 3, 3, 3]), ("neggrad_plus", [1, 1, 1, 1]), ("keep.py", [1, 1])):
        assert sorted(m["batched"] for m in markers.values() if method in (m["method"] or "")) == want, method


def test_augment_is_the_farms_hparam_and_stacks(tmp_path):
    """hparams.augment: true gives other model ids and other models (the retain and forget batches are
    augmented), is not passed to the method, stacks like any other run, and must be a boolean."""
    (alone, stacked), jobs = _unlearn_jobs(TINY_SPEC, tmp_path, "random_label", count=2, augment=True)
    (plain, _), plain_jobs = _unlearn_jobs(TINY_SPEC, tmp_path / "plain", "random_label", count=2)
    assert {j.model_id for j in jobs}.isdisjoint(j.model_id for j in plain_jobs)
    assert "augment" not in get_method("random_label").resolve(jobs[0].hparams)
    for job in jobs:
        alone.run(job)
    stacked.run_batch(jobs)
    a, b = RunStore(str(tmp_path / "alone")).read_conf(), RunStore(str(tmp_path / "stacked")).read_conf()
    np.testing.assert_allclose(b.conf, a.conf, atol=2e-3, rtol=1e-3)
    # one job, with and without augment, in two stores with the same original: other batches, other model
    plain.run(plain_jobs[0])
    alone.run(dataclasses.replace(plain_jobs[0], hparams={**plain_jobs[0].hparams, "augment": True}))
    c, a = RunStore(str(tmp_path / "plain" / "alone")).read_conf(), RunStore(str(tmp_path / "alone")).read_conf()
    mid = plain_jobs[0].model_id
    assert np.abs(c.conf[c.model_ids.index(mid)] - a.conf[a.model_ids.index(mid)]).max() > 1e-2
    d = copy.deepcopy(TINY_SPEC)
    d["unlearn"][0]["hparams"]["augment"] = "yes"
    with pytest.raises(SpecError, match=r"unlearn\[0\].hparams.augment must be true or false, got 'yes'"):
        spec_from_dict(d)


def test_precision_is_the_farms_hparam_and_runs_the_method_under_autocast(tmp_path):
    """hparams.precision: the method (a user's here) runs under bf16 autocast for bf16, under none for fp32,
    absent or auto on a CPU; the key is never passed to the method, gives other model ids, and must be a
    precision the farm knows."""
    seen = tmp_path / "seen.jsonl"
    path = tmp_path / "record.py"
    path.write_text("import json, torch\n"
                    "def unlearn(net, retain, forget, validation, epochs=1, lr=0.0):\n"
                    f"    with open({str(seen)!r}, 'a') as fh:\n"
                    "        fh.write(json.dumps([torch.is_autocast_enabled('cpu'), "
                    "str(torch.get_autocast_dtype('cpu'))]) + '\\n')\n"
                    "    return net\n")
    ids = set()
    for precision in ("bf16", "fp32", "auto", None):
        extra = {"precision": precision} if precision else {}
        (engine, _), jobs = _unlearn_jobs(TINY_SPEC, tmp_path / str(precision), f"{path}:unlearn", count=1,
                                          **extra)
        engine.run(jobs[0])
        ids.add(jobs[0].model_id)
    lines = seen.read_text().splitlines()
    assert [json.loads(line)[0] for line in lines] == [True, False, False, False]
    assert json.loads(lines[0])[1] == "torch.bfloat16"
    assert len(ids) == 4
    d = copy.deepcopy(TINY_SPEC)
    d["unlearn"][0]["hparams"]["precision"] = "fp16"
    with pytest.raises(SpecError, match=r"unlearn\[0\].hparams.precision 'fp16' is unknown; allowed: fp32, "
                                        "bf16, auto"):
        spec_from_dict(d)


def test_a_twin_runs_under_the_precision_its_models_ask_for(tmp_path):
    """finetune with precision bf16, stacked and alone (the same jobs, seeds and originals): the same models
    (one thread), and other models than in float32 (autocast reached the twin and the method)."""
    conf = {}
    for precision in ("bf16", "fp32"):
        (alone, stacked), jobs = _unlearn_jobs(TINY_SPEC, tmp_path / precision, "finetune", count=2)
        # the same jobs (ids, seeds, so batches) but for the precision: it alone can make the models differ
        jobs = [dataclasses.replace(j, hparams={**j.hparams, "precision": precision}) for j in jobs]
        for job in jobs:
            alone.run(job)
        stacked.run_batch(jobs)
        for name in ("alone", "stacked"):
            table = RunStore(str(tmp_path / precision / name)).read_conf()
            conf[precision, name] = table.conf[[table.model_ids.index(j.model_id) for j in jobs]]
    for precision in ("bf16", "fp32"):
        np.testing.assert_allclose(conf[precision, "stacked"], conf[precision, "alone"], atol=1e-5, rtol=1e-5)
    assert np.abs(conf["bf16", "alone"] - conf["fp32", "alone"]).max() > 1e-3


def test_the_ray_driver_waits_as_long_as_a_stack_may_run():
    """The driver's backstop deadline follows the engine's limit: the sum of a batch's limits."""
    from farm.run.ray_executor import DRIVER_GRACE_SECONDS, _deadline
    from farm.train.timelimit import grace_seconds

    def job(i, method="finetune"):
        return Job(f"unlearned-{method}-x-{i:05d}", "unlearned", i, i, np.arange(3), parent="original-00000",
                   method=method, time_limit=10.0)

    def after(limit):
        return limit + grace_seconds(limit) + DRIVER_GRACE_SECONDS

    assert _deadline([job(0)], 0.0) == after(10)
    assert _deadline([job(0), job(1), job(2)], 0.0) == after(30)
    assert _deadline([Job("shadow-00000", "shadow", 0, 0, np.arange(3))], 0.0) is None


def _scheduler(tmp_path, d):
    from farm.run.scheduler import Scheduler

    return Scheduler(prepare_run(spec_from_dict(d), str(tmp_path)), progress=False)


def test_stacks_are_fixed_by_the_plan_and_wait_for_their_members(tmp_path):
    """plan_stacks cuts each kind's pending jobs, in plan order, into stacks of min(k, ceil(n / workers));
    take() hands out a stack whole, once every member is ready, whichever original finished first."""
    d = copy.deepcopy(TINY_SPEC)
    d["counts"] = {"original": 2, "shadow": 4}
    d["unlearn"] = [{"method": "finetune", "count": 4}, {"method": _user_method(tmp_path), "count": 2}]
    sched = _scheduler(tmp_path / "a", d)
    ids = [j.model_id for j in sched.prep.pending]
    sched.plan_stacks(k=3, workers=1)
    trained, fine = ids[:6], [i for i in ids if "finetune" in i]
    assert [sched.stacks[i] for i in trained] == [tuple(trained[:3])] * 3 + [tuple(trained[3:])] * 3
    assert {sched.stacks[i] for i in fine} == {tuple(fine[:3]), tuple(fine[3:])}
    assert not any("keep" in i for i in sched.stacks)  # a user's method has no stacked twin: alone
    sched.plan_stacks(k=8, workers=2)  # shared evenly over two workers
    assert {len(sched.stacks[i]) for i in trained} == {3} and {len(sched.stacks[i]) for i in fine} == {2}

    sched.plan_stacks(k=3, workers=1)
    assert [j.model_id for j in sched.take()] == trained[:3]
    assert [j.model_id for j in sched.take()] == trained[3:]
    # original-00001 finishes first (unlearned 1 and 3 start from it): finetune 1 waits for the rest of its
    # stack (finetune 0 and 2 start from original-00000); finetune 3, alone in its stack, and keep 1 go
    by_id = {j.model_id: j for j in sched.prep.pending}
    sched.succeeded(by_id["original-00001"])
    assert [j.model_id for j in sched.take()] == fine[3:]
    assert [j.model_id for j in sched.take()] == [i for i in ids if "keep" in i and i.endswith("1")]
    assert sched.take() == []
    sched.succeeded(by_id["original-00000"])
    assert [j.model_id for j in sched.take()] == fine[:3]


def test_auto_stacks_two_pass_methods_half_as_deep(tmp_path):
    """batch_models auto sizes a batch from a training step's memory; neggrad_plus and random_label hold two
    forward passes' activations a step, so the engine cuts their batch in two stacks; finetune keeps one."""
    d = copy.deepcopy(TINY_SPEC)
    d["resources"] = {"batch_models": "auto"}
    (_, engine), jobs = _unlearn_jobs(d, tmp_path / "neggrad", "neggrad_plus", count=5)
    assert [m["batched"] for m in engine.run_batch(jobs)] == [3, 3, 3, 2, 2]
    (_, engine), jobs = _unlearn_jobs(d, tmp_path / "finetune", "finetune", count=5)
    assert [m["batched"] for m in engine.run_batch(jobs)] == [5] * 5


def test_a_tune_trial_stacks_its_models_as_a_run_does(tmp_path):
    """A trial of `ufarm tune` on a run with batch_models 3 makes its missing models in stacks within each
    report_every models (the reports come where they would); they equal the same models made by `ufarm
    run`'s plain loop, stacked otherwise, up to float rounding."""
    from farm.run.tune import parse_tune, prepare_setup, score_hparams, trial_hparams

    d = copy.deepcopy(TINY_SPEC)
    d.update(resources={"batch_models": 3}, counts={"original": 2, "retrain": 4}, unlearn=[])
    d["tune"] = {"method": "finetune", "models": 5, "report_every": 2, "params": {"lr": [0.01, 0.02]}}
    spec = spec_from_dict(d)
    setup = prepare_setup(spec, parse_tune(spec), str(tmp_path / "tune"), local=True, progress=False)
    hparams = trial_hparams(get_method("finetune"), {"lr": 0.02}, setup.fixed, 0)
    reports = []
    score_hparams(setup, hparams, report=reports.append)
    assert [r["models"] for r in reports] == [2, 4, 5] and reports[-1]["models_trained"] == 5
    tuned = RunStore(str(tmp_path / "tune"))
    assert sorted(m["batched"] for m in tuned.markers().values() if m["role"] == "unlearned") == [1, 2, 2, 2, 2]
    del d["tune"]
    d["unlearn"] = [{"method": "finetune", "count": 5, "hparams": hparams}]
    result = run_local(prepare_run(spec_from_dict(d), str(tmp_path / "run")), progress=False)
    assert not result.failed
    ran = RunStore(str(tmp_path / "run"))
    assert sorted(m["batched"] for m in ran.markers().values() if m["role"] == "unlearned") == [2, 2, 3, 3, 3]
    a, b = tuned.read_conf(roles=("unlearned",)), ran.read_conf(roles=("unlearned",))
    assert len(a.model_ids) == 5 and a.model_ids == b.model_ids
    np.testing.assert_allclose(a.conf, b.conf, atol=2e-3, rtol=1e-3)
    # a second trial of the same point reuses every model
    assert score_hparams(setup, hparams)["models_reused"] == 5
