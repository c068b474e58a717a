"""`ufarm tune`: the spec section, an end-to-end search through the CLI, failing trials, ASHA, and resume
after an interruption. All searches run on the session's 2-CPU Ray cluster (the ray_address fixture)."""
from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, ufarm
from farm.spec import SpecError, load_spec, load_spec_dict, spec_from_dict
from test_methods import STORE_SPEC, build_store

USER_METHOD = '''
import torch

def unlearn(net, retain, forget, validation, mode="ok", lr=0.01):
    if mode == "raise":
        raise RuntimeError("user bug in unlearn")
    if mode == "none":
        return None
    if mode == "nan":
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(float("nan"))
        return net
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for x, y in retain:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net

unlearn.hparam_space = {
    "mode": {"type": "choice", "choices": ["ok", "raise", "none", "nan"], "default": "ok"},
    "lr": {"type": "float", "low": 0.0, "high": 1.0, "default": 0.01},
}
'''


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    return build_store(tmp_path_factory.getbasetemp())


def tune_spec(**tune) -> dict:
    return {**copy.deepcopy(STORE_SPEC), "tune": tune}


def write_spec(path, raw) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def read_trials(store: str, name: str) -> list[dict]:
    with open(os.path.join(store, "tune", name, "trials.csv")) as fh:
        return list(csv.DictReader(fh))


def test_tune_section_is_checked():
    from farm.run.tune import parse_tune

    ok = parse_tune(spec_from_dict(tune_spec(params={"lr": [0.01, 0.1]}, models=4)))
    assert ok.method == "finetune" and ok.models == 4 and ok.search_name == "finetune-grid"
    bad = [({"params": {"lr": [-1]}}, "lr\\[0\\] must lie in"),
           ({"params": {"nope": [1]}}, "has no hyper-parameter 'nope'"),
           ({"params": {"lr": {"low": 0.001, "high": 0.1}}}, "grid search needs a list"),
           ({"search": "bayes"}, "tune.search 'bayes' is unknown"),
           ({"models": 1}, "tune.models must be an integer >= 2"),
           ({"colour": 1}, "unknown field"),
           ({"params": {"lr": 0.01}}, "fixes every value"),
           ({"params": {"lr": [0.01, 0.1], "precision": "fp16"}},
            "tune.params.precision 'fp16' is unknown; allowed: fp32, bf16, auto"),
           ({"params": {"lr": [0.01, 0.1], "augment": ["yes"]}}, r"tune.params.augment\[0\] must be true or false"),
           ({"params": {"lr": [0.01, 0.1], "precision": None}}, "give the values to search")]
    for section, msg in bad:
        with pytest.raises(SpecError, match=msg):
            parse_tune(spec_from_dict(tune_spec(**section)))
    # the preset holds only its search; the run comes from the store it searches (the demo's)
    from farm.run.tune import is_search_only, merge_search

    raw = load_spec_dict("digits-tune")
    assert is_search_only(raw)
    preset = merge_search(raw, load_spec_dict("digits-demo"))
    assert preset.identity_hash() == load_spec("digits-demo").identity_hash()
    assert preset.counts == {"original": 8, "retrain": 32} and not preset.unlearn
    assert parse_tune(preset).params == {"lr": [0.003, 0.01, 0.03, 0.1], "epochs": [1, 2, 4]}


def test_the_farms_hparams_can_be_fixed_or_searched():
    """precision and augment, which the farm consumes, enter a search like a method's own: fixed or listed,
    and into every trial's hparams (so its model ids)."""
    from farm.run.tune import parse_tune, trial_hparams
    from farm.run.tune.space import param_space
    from farm.train.methods import get_method

    ts = parse_tune(spec_from_dict(tune_spec(params={"lr": [0.01, 0.1], "precision": "bf16",
                                                     "augment": [False, True]})))
    searched, fixed = param_space(ts, get_method("finetune"))
    assert fixed == {"precision": "bf16"} and set(searched) == {"lr", "augment"}
    assert trial_hparams(get_method("finetune"), {"lr": 0.1, "augment": True}, fixed, 0) == \
        {"augment": True, "lr": 0.1, "precision": "bf16"}


def test_a_search_only_spec_completes_from_the_stores_manifest(small_store, tmp_path):
    from farm.run.tune import resolve_tune_spec

    search = {"tune": {"params": {"lr": [0.01, 0.05]}, "models": 3}, "counts": {"original": 2, "retrain": 4}}
    spec = resolve_tune_spec(search, small_store)
    full = spec_from_dict(tune_spec(params={"lr": [0.01, 0.05]}, models=3))
    assert spec.identity_hash() == full.identity_hash() and spec.tune == full.tune
    assert spec.counts == {"original": 2, "retrain": 4} and spec.unlearn == ()
    with pytest.raises(SpecError, match="holds only a search and store .* holds no run"):
        resolve_tune_spec(search, str(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()  # nothing written


def test_tune_end_to_end_writes_trials_best_spec_and_plot(ray_address, small_store, tmp_path):
    spec = write_spec(tmp_path / "t.yaml", tune_spec(
        name="e2e", params={"lr": [0.01, 0.05], "epochs": [1]}, models=3))
    r = ufarm("tune", spec, "--store", small_store, "--no-progress", env={"RAY_ADDRESS": ray_address})
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    assert "beat" in r.stdout and "default" in r.stdout
    rows = read_trials(small_store, "e2e")
    assert sorted(r["status"] for r in rows) == ["BASELINE", "DONE", "DONE"]
    scores = [float(r["final_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        assert int(r["models"]) == 3 and 0 <= float(r["forgetting_quality"]) <= 1 and float(r["time_ratio"]) > 0
    best = load_spec(os.path.join(small_store, "tune", "e2e", "best.yaml"))
    (u,) = best.unlearn
    assert u.method == "finetune" and u.count == 3 and u.hparams["epochs"] == 1
    best_row = [r for r in rows if r["status"] == "DONE"][0]
    assert abs(u.hparams["lr"] - yaml.safe_load(best_row["hparams"])["lr"]) < 1e-12
    assert os.path.getsize(os.path.join(small_store, "tune", "e2e", "fq_vs_utility.png")) > 1000
    # the trials' models are ordinary models of the run: `ufarm run best.yaml` has nothing left to train
    r = ufarm("run", os.path.join(small_store, "tune", "e2e", "best.yaml"), "--store", small_store,
              "--executor", "local", "--no-progress")
    assert r.returncode == 0 and "0 to train" in r.stdout, r.stdout + r.stderr


def test_failing_trials_are_reported_per_model_and_the_search_goes_on(ray_address, small_store, tmp_path):
    from farm.run.tune import run_search

    path = tmp_path / "user_method.py"
    path.write_text(USER_METHOD)
    spec = spec_from_dict(tune_spec(method=f"{path}:unlearn", name="errors", models=2, baseline=False,
                                    params={"mode": ["ok", "raise", "none", "nan"]}))
    res = run_search(spec, small_store, progress=False)
    assert res.complete
    status = {yaml.safe_load(r["hparams"])["mode"]: r for r in res.rows}
    assert status["ok"]["status"] == "DONE"
    expect = {"raise": "RuntimeError: user bug in unlearn", "none": "returned NoneType", "nan": "NaN"}
    for mode, text in expect.items():
        row = status[mode]
        assert row["status"] == "ERROR", row
        assert "model unlearned-user_method.unlearn-" in row["error"] and text in row["error"], row["error"]
    assert res.best is not None and yaml.safe_load(res.best["hparams"])["mode"] == "ok"
    failures = [f for f in os.listdir(os.path.join(small_store, "failed")) if f.startswith("unlearned-user_method")]
    assert len(failures) == 3


def test_random_search_with_asha(ray_address, small_store):
    from farm.run.tune import run_search

    spec = spec_from_dict(tune_spec(name="asha", search="random", samples=3, seed=7, scheduler="asha",
                                    models=4, grace_models=2, baseline=False,
                                    params={"lr": {"low": 0.001, "high": 0.1, "log": True}, "epochs": 1}))
    res = run_search(spec, small_store, progress=False)
    assert res.complete and len(res.rows) == 3
    assert {r["status"] for r in res.rows} <= {"DONE", "STOPPED"} and res.best is not None
    assert all(yaml.safe_load(r["hparams"])["seed"] == 7 for r in res.rows)  # seed 7: new replicates


def test_tune_state_can_live_on_s3(ray_address, small_store, bucket):
    import boto3

    from farm.run.tune import run_search

    spec = spec_from_dict(tune_spec(name="s3state", storage_path=f"s3://{bucket}/tune-state", models=2,
                                    baseline=False, params={"lr": [0.01, 0.02], "epochs": 1}))
    res = run_search(spec, small_store, progress=False)
    assert res.complete and [r["status"] for r in res.rows] == ["DONE", "DONE"]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("tune-state/s3state/experiment_state") for k in keys), keys
    assert os.path.exists(os.path.join(small_store, "tune", "s3state", "trials.csv"))


def test_interrupted_search_resumes_without_redoing_finished_trials(ray_address, small_store, tmp_path):
    spec = write_spec(tmp_path / "r.yaml", tune_spec(
        name="resume", params={"lr": [0.004, 0.008, 0.016]}, models=3, max_concurrent=1, baseline=False))
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    markers = os.path.join(small_store, "models")
    before = set(os.listdir(markers))
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli", "tune", spec, "--store", small_store, "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(set(os.listdir(markers)) - before) >= 4:  # one trial done, the next one started
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the search finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    first = {r["trial_id"]: r for r in read_trials(small_store, "resume")}
    done_first = {t: r for t, r in first.items() if r["status"] == "DONE"}
    assert done_first and len(done_first) < 3, out
    r = ufarm("tune", spec, "--store", small_store, "--no-progress", env={"RAY_ADDRESS": ray_address})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming search 'resume'" in r.stdout
    second = {row["trial_id"]: row for row in read_trials(small_store, "resume")}
    assert len(second) == 3 and all(row["status"] == "DONE" for row in second.values())
    for t, row in done_first.items():
        assert second[t]["timestamp"] == row["timestamp"], "a finished trial was run again"
        assert second[t]["final_score"] == row["final_score"]
    # the models that the interrupted trial had written are reused, not trained again
    assert sum(int(row["models_reused"]) for t, row in second.items() if t not in done_first) >= 1
