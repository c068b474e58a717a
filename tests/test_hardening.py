"""Every input ends, and secrets stay where they are: credentials never reach Ray's logs or the store,
oversized plans, impossible resources, runaway or exiting user methods, non-finite numbers, malformed
YAML and SIGTERM all end with a clear one-line error or a failed model."""
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import boto3
import numpy as np
import pytest
import yaml

from farm.cli import main
from farm.spec import SpecError, load_spec, spec_from_dict
from farm.store import RunStore
from tests.conftest import REPO, TINY_SPEC, ufarm

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAUFARMHARDENING77", "AWS_SECRET_ACCESS_KEY": "ufarm-Secret-9f3c1e7d2b54a6",
           "AWS_SESSION_TOKEN": "ufarm-Session-Token-4a8b0c6e1f"}


def _spec_file(tmp_path, name="spec.yaml", **changes):
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _method_file(tmp_path, body, name="user_method.py"):
    path = tmp_path / name
    path.write_text("import sys, time\nimport torch\n\n\ndef unlearn(net, retain, forget, validation):\n" + body)
    return path


@pytest.fixture
def ray_tmp():
    """A short, private Ray temp dir (unix socket paths are limited to about 100 characters)."""
    path = tempfile.mkdtemp(prefix="ufh", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _own_ray_env(ray_tmp, **extra):
    """The environment of a driver that starts its own local Ray, with its temp dir in ray_tmp."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, **extra)
    return env


def _ray_processes(ray_tmp):
    out = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def _wait_no_ray_processes(ray_tmp, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline and _ray_processes(ray_tmp):
        time.sleep(0.5)
    return _ray_processes(ray_tmp)


# ------------------------------------------------------------------------------------------ secrets

def test_credentials_never_reach_ray_logs_or_the_store(bucket, tmp_path, ray_tmp):
    """A fresh `ufarm run` on an S3 store that starts its own local Ray: workers still reach the store
    (endpoint forwarded, credentials inherited), and no credential is in any file under Ray's temp dir, in
    the store (manifest, markers, failure records) or in the output."""
    failing = _method_file(tmp_path, "    raise ValueError('no luck')\n")
    spec = _spec_file(tmp_path, counts={"original": 1, "retrain": 2, "shadow": 2}, max_retries=0,
                      unlearn=[{"method": "finetune", "count": 1, "hparams": {"lr": 0.01, "epochs": 1}},
                               {"method": f"{failing}:unlearn", "count": 1}])
    uri = f"s3://{bucket}/run"
    r = subprocess.run([sys.executable, "-m", "farm.cli", "run", str(spec), "--store", uri, "--no-progress"],
                       capture_output=True, text=True, cwd=REPO, timeout=600, env=_own_ray_env(ray_tmp, **SECRETS))
    assert r.returncode == 1, r.stderr  # the one failing method
    assert "7 models planned" in r.stdout and "trained 6 models" in r.stdout, r.stdout + r.stderr
    assert len(RunStore(uri).failures()) == 1
    logs = [os.path.join(d, f) for d, _, files in os.walk(ray_tmp) for f in files]
    assert any(os.path.basename(p) == "runtime_env_agent.log" or "runtime_env" in p for p in logs), logs[:20]
    s3 = boto3.client("s3")
    objects = {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
               for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert any(k.startswith("run/failed/") for k in objects) and "run/manifest.json" in objects
    for name, secret in SECRETS.items():
        needle = secret.encode()
        for path in logs:
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    assert needle not in fh.read(), f"{name} found in {path}"
        for key, body in objects.items():
            assert needle not in body, f"{name} found in s3://{bucket}/{key}"
        assert secret not in r.stdout and secret not in r.stderr
    assert not _wait_no_ray_processes(ray_tmp), "the local Ray that the driver started still runs"


def _files_hold_no_secret(root):
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    data = fh.read()
                for name, secret in SECRETS.items():
                    assert secret.encode() not in data, f"{name} found in {path}"


def test_tune_and_its_trials_never_write_credentials(bucket, tmp_path, ray_tmp):
    """Ray Tune copies AWS credential variables into each trial actor's runtime_env (logged by Ray);
    ufarm takes them off that list: a search on an S3 store leaves no secret in Ray's files or the store."""
    spec = _spec_file(tmp_path, counts={"original": 1, "retrain": 2}, unlearn=[],
                      tune={"method": "finetune", "params": {"lr": [0.01]}, "models": 2, "baseline": False})
    uri = f"s3://{bucket}/run"
    r = subprocess.run([sys.executable, "-m", "farm.cli", "tune", str(spec), "--store", uri, "--no-progress"],
                       capture_output=True, text=True, cwd=REPO, timeout=600, env=_own_ray_env(ray_tmp, **SECRETS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ufarm tune: trials:" in r.stdout
    logs = [os.path.join(d, f) for d, _, files in os.walk(ray_tmp) for f in files]
    assert any("runtime_env" in p for p in logs), logs[:20]
    _files_hold_no_secret(ray_tmp)
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("run/tune/") for k in keys) and any(k.startswith("run/models/unlearned-") for k in keys)
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        for name, secret in SECRETS.items():
            assert secret.encode() not in body, f"{name} found in s3://{bucket}/{key}"
    for secret in SECRETS.values():
        assert secret not in r.stdout and secret not in r.stderr
    assert not _wait_no_ray_processes(ray_tmp), "the local Ray that the driver started still runs"


def test_forwarded_env_holds_no_credential(monkeypatch):
    from farm.settings import FORWARDED_ENV, forwarded_env

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("UFARM_S3_ATTEMPTS", "2")
    env = forwarded_env()
    assert not set(SECRETS) & set(FORWARDED_ENV) and not set(SECRETS) & set(env)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1" and env["UFARM_S3_ATTEMPTS"] == "2"


def test_errors_and_log_lines_do_not_carry_credentials(monkeypatch, capsys, tmp_path):
    import logging

    from farm.cli import redact

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    line = f"denied for {SECRETS['AWS_ACCESS_KEY_ID']} with {SECRETS['AWS_SECRET_ACCESS_KEY']}"
    assert redact(line) == "denied for *** with ***"
    bad = _spec_file(tmp_path, name=f"{SECRETS['AWS_SECRET_ACCESS_KEY']}.yaml", counts={"original": 0})
    assert main(["run", str(bad), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "counts.original must be a positive integer" in err and SECRETS["AWS_SECRET_ACCESS_KEY"] not in err
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("ufarm")
    log.addHandler(handler)
    try:
        log.warning("retrying with %s", SECRETS["AWS_SESSION_TOKEN"])
    finally:
        log.removeHandler(handler)
    assert records and SECRETS["AWS_SESSION_TOKEN"] not in records[0].getMessage()


# ------------------------------------------------------------------------------------- plan sizes

@pytest.mark.parametrize("change,needle", [
    (lambda d: d["counts"].update(original=1_000_000_000_000), "counts.original must be at most 1,000,000"),
    (lambda d: d["counts"].update(shadow=2_000_000), "counts.shadow must be at most 1,000,000"),
    (lambda d: d["unlearn"][0].update(count=5_000_000), "unlearn[0].count must be at most 1,000,000"),
])
def test_counts_beyond_the_maximum_are_refused_at_once(change, needle, tmp_path, capsys):
    d = copy.deepcopy(TINY_SPEC)
    change(d)
    started = time.perf_counter()
    with pytest.raises(SpecError) as err:
        spec_from_dict(d)
    assert needle in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(d))
    store = tmp_path / "store"
    assert main(["run", str(path), "--store", str(store), "--executor", "local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ufarm: error: ") and err.count("\n") == 1 and needle in err
    assert not store.exists() and time.perf_counter() - started < 30


def test_shadow_memberships_beyond_the_plan_limit_are_refused(monkeypatch):
    import farm.plan as plan

    monkeypatch.setattr(plan, "MAX_SHADOW_CELLS", 10_000)
    split = np.array(["train"] * 1000 + ["test"] * 100)
    labels = np.arange(1100) % 10
    d = copy.deepcopy(TINY_SPEC)
    d["counts"]["shadow"] = 20
    spec = spec_from_dict(d)
    with pytest.raises(SpecError, match=r"counts.shadow 20 is too many for 1,000 train examples: .* at most 10 "):
        plan.make_plan(spec, split, labels)
    d["counts"]["shadow"] = 10
    assert len(plan.make_plan(spec_from_dict(d), split, labels).jobs) == 15


# ---------------------------------------------------------------------------------- resources

def test_resources_no_node_can_hold_fail_at_once_on_a_joined_cluster(ray_address, tmp_path):
    spec = _spec_file(tmp_path, resources={"cpus": 1000})
    store = tmp_path / "run"
    started = time.perf_counter()
    r = ufarm("run", spec, "--store", store, "--no-progress", env={"RAY_ADDRESS": ray_address}, timeout=180)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("ufarm: error: resources.cpus 1000 is more than any node of the Ray cluster has "
                              "(the largest node has 2 CPUs and 0 GPUs)"), r.stderr
    assert time.perf_counter() - started < 120
    assert not os.listdir(store / "models") if (store / "models").exists() else True


def test_wait_for_resources_waits_then_fails(ray_address, tmp_path, capsys):
    spec = _spec_file(tmp_path, resources={"cpus": 1, "gpus": 1})
    started = time.perf_counter()
    assert main(["run", str(spec), "--store", str(tmp_path / "run"), "--no-progress",
                 "--wait-for-resources", "3"]) == 2
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert "resources.gpus 1 is more than any node of the Ray cluster has" in err
    assert "also after waiting 3 s" in err and 3 <= seconds < 60


def test_the_session_cluster_is_seen_without_an_autoscaler(ray_address):
    from farm.run.ray_executor import _cluster_autoscales

    assert _cluster_autoscales() is False


def test_resources_check_with_an_own_local_ray_and_ray_stops(tmp_path, ray_tmp):
    spec = _spec_file(tmp_path, resources={"cpus": 1000})
    r = subprocess.run([sys.executable, "-m", "farm.cli", "run", str(spec), "--store", str(tmp_path / "run"),
                        "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=_own_ray_env(ray_tmp))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ufarm: error: resources.cpus 1000 is more than any node")
    assert not _wait_no_ray_processes(ray_tmp), "the local Ray that the driver started still runs"


# ------------------------------------------------------------------------------------ time limit

SLEEPS = "    time.sleep(1000)\n    return net\n"
SWALLOWS = ("    while True:\n        try:\n            time.sleep(0.1)\n        except BaseException:\n"
            "            pass\n")


def _unlearn_spec(tmp_path, method_body, time_limit=None, **changes):
    path = _method_file(tmp_path, method_body)
    item = {"method": f"{path}:unlearn", "count": 1}
    if time_limit is not None:
        item["time_limit"] = time_limit
    raw = {**copy.deepcopy(TINY_SPEC), "counts": {"original": 1}, "max_retries": 0,
           "unlearn": [item, {"method": "finetune", "count": 1, "hparams": {"lr": 0.01, "epochs": 1}}], **changes}
    return raw


def _check_timed_out(store_uri, result_failed, limit):
    (mid,) = result_failed
    assert mid.startswith("unlearned-user_method.unlearn-")
    assert f"ran past its time limit of {limit:g} s" in result_failed[mid]
    assert f"ran past its time limit of {limit:g} s" in RunStore(store_uri).failures()[mid]["error"]
    assert len(RunStore(store_uri).intact_models()) == 2  # the original and the finetune model


def test_time_limit_ends_a_method_local(tmp_path):
    from farm.run import prepare_run, run_local

    uri = str(tmp_path / "run")
    started = time.perf_counter()
    res = run_local(prepare_run(spec_from_dict(_unlearn_spec(tmp_path, SLEEPS, time_limit=2)), uri), progress=False)
    assert time.perf_counter() - started < 120
    _check_timed_out(uri, res.failed, 2)
    time.sleep(1.5)  # no interrupt is left behind once the call ended
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)


def test_time_limit_ends_a_method_under_ray(ray_address, tmp_path):
    from farm.run import run_spec

    uri = str(tmp_path / "run")
    res = run_spec(spec_from_dict(_unlearn_spec(tmp_path, SLEEPS, time_limit=2)), uri, progress=False)
    _check_timed_out(uri, res.failed, 2)


def test_a_method_that_swallows_the_interrupt_ends_the_local_run(tmp_path):
    spec = tmp_path / "swallow.yaml"
    spec.write_text(yaml.safe_dump(_unlearn_spec(tmp_path, SWALLOWS, time_limit=1)))
    store = tmp_path / "run"
    started = time.perf_counter()
    r = ufarm("run", spec, "--store", store, "--executor", "local", "--no-progress", timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "could not be interrupted" in r.stderr and time.perf_counter() - started < 200
    (record,) = RunStore(str(store)).failures().values()
    assert "still ran 2 s after its time limit of 1 s" in record["error"]


def test_a_method_that_swallows_the_interrupt_is_a_failed_model_under_ray(ray_address, tmp_path):
    """The worker ends itself and writes why; the driver fails the model at once instead of re-queuing it
    as a lost worker (which would run the stuck method three more times)."""
    from farm.run import run_spec

    uri = str(tmp_path / "run")
    started = time.perf_counter()
    res = run_spec(spec_from_dict(_unlearn_spec(tmp_path, SWALLOWS, time_limit=1)), uri, progress=False)
    assert time.perf_counter() - started < 120
    (mid,) = res.failed
    assert "still ran 2 s after its time limit of 1 s and could not be interrupted" in res.failed[mid]
    assert len(RunStore(uri).intact_models()) == 2


# one C call that runs for hours without releasing the GIL or reaching the interpreter's eval loop: neither
# the alarm nor the worker's watchdog thread can run, so only the driver can end it
HOLDS_THE_GIL = "    sum(range(10 ** 15))\n    return net\n"


def test_the_driver_ends_a_worker_its_time_limit_cannot_reach(ray_address, tmp_path, monkeypatch):
    from farm.run import ray_executor as runner

    monkeypatch.setattr(runner, "DRIVER_GRACE_SECONDS", 3.0)
    uri = str(tmp_path / "run")
    started = time.perf_counter()
    res = runner.run_spec(spec_from_dict(_unlearn_spec(tmp_path, HOLDS_THE_GIL, time_limit=1)), uri, progress=False)
    assert time.perf_counter() - started < 120
    (mid,) = res.failed
    assert "ran past its time limit of 1 s and its worker did not end it; the driver ended the worker" \
        in RunStore(uri).failures()[mid]["error"]
    assert len(RunStore(uri).intact_models()) == 2


@pytest.mark.parametrize("value,needle", [
    (0, "unlearn[0].time_limit must be a finite number of seconds > 0"),
    (-5, "unlearn[0].time_limit must be a finite number of seconds > 0"),
    ("soon", "unlearn[0].time_limit must be a number"),
    (float("inf"), "unlearn[0].time_limit must be a finite number"),
])
def test_time_limit_is_validated(value, needle):
    d = copy.deepcopy(TINY_SPEC)
    d["unlearn"][0]["time_limit"] = value
    with pytest.raises(SpecError) as err:
        spec_from_dict(d)
    assert needle in str(err.value)
    d["unlearn"][0]["time_limit"] = 30
    spec = spec_from_dict(d)
    assert spec.unlearn[0].time_limit == 30.0 and spec_from_dict(spec.to_dict()) == spec
    assert spec_from_dict(TINY_SPEC).unlearn[0].time_limit == 3600.0


def test_call_with_time_limit_in_and_outside_the_main_thread():
    from farm.train.timelimit import TimeLimitExceeded, call_with_time_limit

    assert call_with_time_limit(lambda: 7, 5) == 7

    def spin():
        while True:
            sum(range(1000))

    with pytest.raises(TimeLimitExceeded):
        call_with_time_limit(lambda: time.sleep(100), 0.5)  # main thread: SIGALRM ends the sleep
    out = {}

    def in_thread():
        try:
            call_with_time_limit(spin, 0.5)
        except TimeLimitExceeded as exc:
            out["error"] = exc
        time.sleep(1.5)  # nothing injected later
        out["after"] = "fine"

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(30)
    assert isinstance(out.get("error"), TimeLimitExceeded) and out.get("after") == "fine"


# ---------------------------------------------------------------------------- methods that exit

def test_sys_exit_in_a_method_is_a_failed_model_local(tmp_path, capsys):
    spec = tmp_path / "exit.yaml"
    spec.write_text(yaml.safe_dump(_unlearn_spec(tmp_path, "    sys.exit(0)\n")))
    store = tmp_path / "run"
    rc = main(["run", str(spec), "--store", str(store), "--executor", "local", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out
    (record,) = RunStore(str(store)).failures().values()
    assert "tried to end the process (SystemExit: 0)" in record["error"]
    assert len(RunStore(str(store)).intact_models()) == 2


def test_sys_exit_in_a_method_is_a_failed_model_under_ray(ray_address, tmp_path):
    spec = tmp_path / "exit.yaml"
    spec.write_text(yaml.safe_dump(_unlearn_spec(tmp_path, "    sys.exit(3)\n")))
    store = tmp_path / "run"
    r = ufarm("run", spec, "--store", store, "--no-progress", env={"RAY_ADDRESS": ray_address})
    assert r.returncode == 1, r.stdout + r.stderr
    (record,) = RunStore(str(store)).failures().values()
    assert "tried to end the process (SystemExit: 3)" in record["error"] and record["worker_deaths"] == 0


# ---------------------------------------------------------------------------------- low items

@pytest.mark.parametrize("text,needle", [
    ("training:\n  lr: .inf\n", "training.lr must be a finite number, got inf"),
    ("resources:\n  cpus: .nan\n", "resources.cpus must be a finite number, got nan"),
    ("forget:\n  fraction: -.inf\n", "forget.fraction must be a finite number, got -inf"),
    ("time_cutoff: .nan\n", "time_cutoff must be a finite number, got nan"),
    ("unlearn:\n  - {method: finetune, count: 1, hparams: {lr: .nan}}\n",
     "unlearn[0].hparams.lr must be a finite number, got nan"),
])
def test_non_finite_numbers_are_refused(text, needle, tmp_path):
    path = tmp_path / "s.yaml"  # the section given last replaces the one of TINY_SPEC
    path.write_text(yaml.safe_dump({k: v for k, v in TINY_SPEC.items() if k != "unlearn"}) + text)
    with pytest.raises(SpecError) as err:
        load_spec(str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["name: [unclosed\n", "counts: {original: 1\n", "a: b: c\n", "\tname: x\n"])
def test_malformed_yaml_is_one_line_exit_2(text, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    store = tmp_path / "store"
    assert main(["run", str(path), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ufarm: error: spec '{path}' is not valid YAML: ") and err.count("\n") == 1, err
    assert not store.exists()


def test_shadow_count_message_matches_what_is_accepted(tmp_path, capsys):
    d = copy.deepcopy(TINY_SPEC)
    d["counts"]["shadow"] = 3
    with pytest.raises(SpecError, match="must be even .*membership inference needs at least 4"):
        spec_from_dict(d)
    spec = _spec_file(tmp_path, counts={"original": 1, "shadow": 2}, unlearn=[])
    assert main(["run", str(spec), "--store", str(tmp_path / "run"), "--executor", "local", "--no-progress"]) == 0
    assert "2 shadows train, but ufarm evaluate's membership inference needs at least 4" in capsys.readouterr().out


def test_nan_output_error_names_the_method(tmp_path):
    from farm.run import prepare_run, run_local

    body = ("    with torch.no_grad():\n        for p in net.parameters():\n            p.fill_(float('nan'))\n"
            "    return net\n")
    raw = _unlearn_spec(tmp_path, body)
    uri = str(tmp_path / "run")
    res = run_local(prepare_run(spec_from_dict(raw), uri), progress=False)
    (mid,) = res.failed
    assert f"method '{raw['unlearn'][0]['method']}' produced NaN or infinite logits" in res.failed[mid]


def test_sigterm_ends_a_run_like_ctrl_c_and_stops_its_ray(tmp_path, ray_tmp):
    spec = _spec_file(tmp_path, counts={"original": 1, "retrain": 12}, unlearn=[],
                      training={**TINY_SPEC["training"], "epochs": 6})
    store = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli", "run", str(spec), "--store", str(store),
                             "--no-progress"], cwd=REPO, env=_own_ray_env(ray_tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and \
            len(os.listdir(store / "models") if (store / "models").is_dir() else []) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "ufarm: interrupted; models already committed stay, re-run the same command to resume" in err
    committed = RunStore(str(store)).intact_models()
    assert 2 <= len(committed) < 13
    assert not _wait_no_ray_processes(ray_tmp), "the local Ray that the driver started still runs"


@pytest.mark.parametrize("name,value,needle", [
    ("UFARM_S3_RETRIES", "many", "UFARM_S3_RETRIES must be an integer, got 'many'"),
    ("UFARM_LEASE_SECONDS", "-1", "UFARM_LEASE_SECONDS must be a finite number >= 0.5, got '-1'"),
    ("UFARM_S3_REQUEST_TIMEOUT", "nan", "UFARM_S3_REQUEST_TIMEOUT must be a finite number >= 0.1, got 'nan'"),
])
def test_a_bad_environment_setting_is_one_line(name, value, needle, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(name, value)
    assert main(["status", "--store", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"ufarm: error: {needle}"
    assert not (tmp_path / "none").exists()
