"""End to end through the `ufarm` command line, as a user runs it (subprocesses join the session's Ray)."""
import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import pyarrow.parquet as pq
import pytest
import yaml

from farm.cli import main
from farm.store import RunStore
from tests.conftest import REPO, TINY_SPEC, assert_same_report, report_files, ufarm


def _conf_bytes(uri):
    store = RunStore(uri)
    out = {}
    for mid, marker in store.markers().items():
        out[mid] = store.read_logits(mid, marker, columns=["conf"]).column("conf").to_numpy().tobytes()
    return out


@pytest.fixture(scope="module")
def demo_store(ray_address, tmp_path_factory):
    """The README's demo, run once: `ufarm demo --store DIR`."""
    store = tmp_path_factory.mktemp("demo") / "run"
    r = ufarm("demo", "--store", store, "--no-progress", env={"RAY_ADDRESS": ray_address}, timeout=1200)
    assert r.returncode == 0, r.stderr
    return store, r.stdout


def test_demo_end_to_end(demo_store):
    store, stdout = demo_store
    assert f"the run is in {store}" in stdout
    assert "total           160      160        0        0" in stdout
    s = ufarm("status", store)
    assert s.returncode == 0 and "total           160      160        0        0" in s.stdout
    markers = RunStore(str(store)).markers()
    originals = [m for m in markers.values() if m["role"] == "original"]
    assert all(m["accuracy"]["test"] > 0.8 for m in originals)  # the demo trains real models
    # the demo ends with the evaluation's headline, each figure with its interval
    assert "evaluation (ufarm evaluate):" in stdout and "LiRA online: AUC " in stdout
    assert "32 models from 32 originals): F/F_null at " in stdout
    assert (store / "report" / "report.md").exists()


def test_demo_store_evaluates_on_ray_to_the_single_process_report(demo_store, ray_address, tmp_path):
    store, _ = demo_store  # the demo wrote <store>/report/ with the single process's evaluation
    r = ufarm("evaluate", "--store", store, "--out", tmp_path / "ray", "--executor", "ray", "--chunk-examples", "256",
              "--no-progress", env={"RAY_ADDRESS": ray_address}, timeout=900)
    assert r.returncode == 0, r.stderr
    assert_same_report(report_files(str(tmp_path / "ray")), report_files(str(store / "report")))


def test_run_resume_and_determinism(ray_address, tiny_spec_file, tmp_path):
    env = {"RAY_ADDRESS": ray_address}
    a, b = tmp_path / "a", tmp_path / "b"
    r = ufarm("run", tiny_spec_file, "--store", a, "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert "7 models planned, 0 already done, 7 to train" in r.stdout
    again = ufarm("run", tiny_spec_file, "--store", a, "--no-progress", env=env)
    assert "7 already done, 0 to train" in again.stdout and again.returncode == 0
    # a flipped byte keeps the size: --verify finds it by checksum and retrains only that model
    victim = a / "logits" / "shadow-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    fixed = ufarm("run", tiny_spec_file, "--store", a, "--no-progress", "--verify", env=env)
    assert "6 already done, 1 to train" in fixed.stdout and fixed.returncode == 0
    # the same spec and seed in another store, and with the plain in-process loop: identical conf bytes
    assert ufarm("run", tiny_spec_file, "--store", b, "--executor", "local", "--no-progress").returncode == 0
    ca, cb = _conf_bytes(str(a)), _conf_bytes(str(b))
    assert sorted(ca) == sorted(cb) and len(ca) == 7
    assert all(ca[m] == cb[m] for m in ca)


def test_demo_on_s3_gives_the_same_models(demo_store, ray_address, bucket):
    uri = f"s3://{bucket}/runs/demo"
    r = ufarm("demo", "--store", uri, "--no-progress", env={"RAY_ADDRESS": ray_address}, timeout=1200)
    assert r.returncode == 0, r.stderr
    assert "total           160      160        0        0" in r.stdout
    local = _conf_bytes(str(demo_store[0]))
    assert _conf_bytes(uri) == local and len(local) == 160
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sum(k.startswith("runs/demo/logits/") for k in keys) == 160
    assert sum(k.startswith("runs/demo/models/") for k in keys) == 160
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"].split("://")[1], scheme="http",
                           region="us-east-1")
    for key in keys:  # every object is readable with pyarrow
        if key.endswith(".parquet"):
            assert pq.read_table(f"{bucket}/{key}", filesystem=fs).num_rows > 0
        elif key.endswith(".json"):
            with fs.open_input_stream(f"{bucket}/{key}") as fh:
                json.loads(fh.read())
    status = ufarm("status", uri)
    assert "total           160      160        0        0" in status.stdout


def _snapshot(store):
    out = {}
    for sub in ("logits", "models", "weights"):
        folder = store / sub
        if folder.is_dir():
            for name in os.listdir(folder):
                out[f"{sub}/{name}"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return out


def test_driver_killed_mid_run_resumes(ray_address, tmp_path):
    spec = copy.deepcopy(TINY_SPEC)
    spec["counts"] = {"original": 1, "retrain": 8, "shadow": 8}
    spec["training"]["epochs"] = 4
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    store = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli", "run", str(path), "--store", str(store),
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(os.listdir(store / "models") if (store / "models").is_dir() else []) < 4:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the cluster notices the dead driver and stops its workers
    before = _snapshot(store)
    committed = {k for k in before if k.startswith("models/")}
    assert 4 <= len(committed) < 19
    r = ufarm("run", path, "--store", store, "--no-progress", env={"RAY_ADDRESS": ray_address})
    assert r.returncode == 0, r.stderr
    assert f"{len(committed)} already done, {19 - len(committed)} to train" in r.stdout
    after = _snapshot(store)
    for key in committed:  # nothing committed before the kill was rewritten
        mid = key[len("models/"):-len(".json")]
        assert after[key] == before[key] and after[f"logits/{mid}.parquet"] == before[f"logits/{mid}.parquet"]
    assert len([k for k in after if k.startswith("logits/")]) == 19
    assert not any(os.path.basename(k).startswith(".tmp-") for k in after)
    store_obj = RunStore(str(store))
    assert len(store_obj.intact_models()) == 19
    store_obj.read_conf()  # every checksum verifies


def test_failing_job_is_reported_and_others_finish(ray_address, tmp_path, capsys):
    method = tmp_path / "broken_method.py"
    method.write_text("def unlearn(net, retain, forget, validation):\n    raise ValueError('Invalid learning rate')\n")
    spec = copy.deepcopy(TINY_SPEC)
    spec["unlearn"].append({"method": f"{method}:unlearn", "count": 1})  # a user's method that always raises
    spec["max_retries"] = 1
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    store = tmp_path / "run"
    rc = main(["run", str(path), "--store", str(store), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    bad = [m for m in out.splitlines() if m.startswith("  failed unlearned-")]
    assert len(bad) == 1 and "Invalid learning rate" in bad[0]
    store_obj = RunStore(str(store))
    assert len(store_obj.intact_models()) == 7
    failure = next(iter(store_obj.failures().values()))
    assert failure["attempts"] == 2 and 'line 46, in __init__' not in failure["error"]
    assert "Invalid learning rate" in failure["traceback"] and ", line " in failure["traceback"]
    main(["status", str(store)])
    assert "unlearned         3        2        1        1" in capsys.readouterr().out


def test_worker_killed_mid_job_is_rerun(ray_address, tmp_path):
    from farm.run import run_spec
    from farm.spec import spec_from_dict

    spec = copy.deepcopy(TINY_SPEC)
    spec["counts"] = {"original": 1, "retrain": 6}
    spec["unlearn"] = []
    spec["training"]["epochs"] = 6
    killed = []

    def kill_one_worker():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            pids = subprocess.run(["pgrep", "-f", "ray::FarmWorker.run"], capture_output=True, text=True).stdout.split()
            if pids:
                os.kill(int(pids[0]), signal.SIGKILL)
                killed.append(int(pids[0]))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    result = run_spec(spec_from_dict(spec), str(tmp_path / "run"), progress=False)
    killer.join()
    assert killed, "no worker was found to kill"
    assert not result.failed and len(result.trained) == 7
    assert len(RunStore(str(tmp_path / "run")).intact_models()) == 7


@pytest.mark.parametrize("args,needle", [
    (["run", "no-such-preset", "--store", "{store}"], "unknown preset 'no-such-preset'"),
    (["run", "{spec:dataset.name=imagenet}", "--store", "{store}"], "dataset.name 'imagenet' is unknown"),
    (["run", "{spec:counts.retrain=-2}", "--store", "{store}"], "counts.retrain must be a positive integer"),
    (["run", "{spec:counts.shadow=0}", "--store", "{store}"], "counts.shadow must be a positive integer"),
    (["run", "{spec:forget.fraction=1.0}", "--store", "{store}"], "forget.fraction must lie in (0, 1)"),
    (["run", "{spec:forget=classes}", "--store", "{store}"], "forget.classes [42] do not exist"),
    (["run", "{spec:dataset=fashion-missing}", "--store", "{store}"], "install Debian's dataset-fashion-mnist"),
])
def test_bad_input_one_line_and_nothing_written(args, needle, tmp_path, capsys):
    store = tmp_path / "store"
    spec = copy.deepcopy(TINY_SPEC)
    resolved = []
    for a in args:
        if a.startswith("{spec:"):
            change = a[len("{spec:"):-1]
            if change == "forget=classes":
                spec["forget"] = {"kind": "classes", "classes": [42]}
            elif change == "dataset=fashion-missing":
                spec["dataset"] = {"name": "fashion-mnist", "path": str(tmp_path / "nowhere")}
            else:
                key, value = change.split("=")
                section, field = key.split(".")
                spec[section][field] = yaml.safe_load(value)
            p = tmp_path / "spec.yaml"
            p.write_text(yaml.safe_dump(spec))
            a = str(p)
        resolved.append(a.replace("{store}", str(store)))
    rc = main(resolved)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("ufarm: error: ") and err.count("\n") == 1 and needle in err
    assert not store.exists()


def test_store_with_another_spec_is_refused(ray_address, tiny_spec_file, tmp_path, capsys):
    store = tmp_path / "run"
    assert main(["run", str(tiny_spec_file), "--store", str(store), "--executor", "local", "--no-progress"]) == 0
    before = _snapshot(store)
    other = copy.deepcopy(TINY_SPEC)
    other["seed"] = 4
    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(other))
    capsys.readouterr()
    assert main(["run", str(p), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "holds another spec ('tiny'); fields that differ: forget" not in err  # seed is what differs
    assert "fields that differ: seed" in err and err.count("\n") == 1
    assert _snapshot(store) == before


def test_s3_bad_endpoint_and_missing_bucket(s3_server, tiny_spec_file, capsys, monkeypatch):
    assert main(["run", str(tiny_spec_file), "--store", "s3://absent-bucket/run"]) == 2
    assert "S3 bucket 'absent-bucket' does not exist" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing answers
    monkeypatch.setenv("UFARM_S3_ATTEMPTS", "1")
    assert main(["run", str(tiny_spec_file), "--store", "s3://b/run"]) == 2
    assert "cannot reach the S3 store s3://b/run" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the CLI's own habits

def test_version_methods_and_help_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("ufarm ")
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "finetune: Fine-tune on the retain set only" in out and "lr (float): default 0.01" in out
    assert main(["methods", "--json"]) == 0
    methods = json.loads(capsys.readouterr().out)
    assert methods["finetune"]["space"]["epochs"]["default"] == 2
    for command in ("run", "plan", "status", "demo", "tune", "evaluate", "export", "methods", "presets"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "examples:\n  ufarm " in capsys.readouterr().out, command


def test_plan_writes_nothing_and_estimates_from_the_store(tiny_spec_file, tmp_path, capsys):
    store = tmp_path / "run"
    tiny_spec_file = str(tiny_spec_file)
    assert main(["plan", tiny_spec_file]) == 0
    out = capsys.readouterr().out
    assert ["original", "1", "0", "1", "-", "-"] in [ln.split() for ln in out.splitlines()]
    assert "nothing was written" in out
    assert main(["run", tiny_spec_file, "--store", str(store), "--executor", "local", "--no-progress"]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in store.rglob("*"))
    assert main(["plan", tiny_spec_file, "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert ["original", "1", "1", "0"] in [ln.split()[:4] for ln in out.splitlines()]
    assert "about 0 model-seconds left" in out
    assert sorted(p.name for p in store.rglob("*")) == before
    assert not (tmp_path / "other").exists()


def test_store_is_given_the_same_way_everywhere_and_local_is_deprecated(tiny_spec_file, tmp_path, capsys):
    store, tiny_spec_file = str(tmp_path / "run"), str(tiny_spec_file)
    assert main(["run", tiny_spec_file, "--store", store, "--local", "--no-progress"]) == 0
    assert "--local is deprecated" in capsys.readouterr().err
    assert main(["status", "--store", store]) == 0 and main(["status", store]) == 0
    capsys.readouterr()
    assert main(["status", store, "--store", str(tmp_path / "other")]) == 2
    assert "two stores given" in capsys.readouterr().err
    assert main(["status"]) == 2 and "needs a store: --store URI" in capsys.readouterr().err
    assert main(["run", tiny_spec_file, "--store", store, "--local", "--executor", "ray"]) == 2
    assert "contradict" in capsys.readouterr().err
