"""Every store is untrusted input: derived paths, damaged entries, checksums, S3 URIs, format_version, lease."""
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.cli import main
from farm.plan import make_plan
from farm.run import PreparedRun, prepare_run, run_local
from farm.spec import UnlearnSpec, spec_from_dict
from farm.status import summarize
from farm.store import RunStore, StoreError, check_compatible, examples_table, is_model_id, logits_table, run_store
from tests.conftest import REPO, TINY_SPEC
from tests.conftest import CountingFS

TINY_IDS = ["original-00000", "retrain-00000", "retrain-00001", "shadow-00000", "shadow-00001",
            "unlearned-finetune-77143f41-00000", "unlearned-finetune-77143f41-00001"]


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """TINY_SPEC trained once, in-process (about 10 s); tests work on copies."""
    uri = str(tmp_path_factory.mktemp("integrity") / "run")
    result = run_local(prepare_run(spec_from_dict(copy.deepcopy(TINY_SPEC)), uri), progress=False)
    assert not result.failed and sorted(result.trained) == TINY_IDS
    return uri


def _copy(base: str, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(base, dst)
    return dst


def _spec(**changes):
    return spec_from_dict({**copy.deepcopy(TINY_SPEC), **changes})


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ufarm" and r.levelno == logging.WARNING]


def _small_store(root, n_e=20, n_q=1):
    store = RunStore(str(root))
    manifest = {"format_version": 1, "spec": {"name": "t", "queries": ["plain"] * n_q}, "identity": "x",
                "identity_fields": {"seed": 0}, "dataset": {"name": "d", "fingerprint": "f" * 64},
                "n_examples": n_e, "n_classes": 3}
    split = np.array(["train"] * n_e)
    store.init_run(manifest, examples_table(split, np.zeros(n_e, int), None, np.zeros(n_e, bool)))
    return store, manifest


def _table(seed=0, n_e=20, n_q=1, n_c=3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n_e, n_q, n_c)).astype(np.float32)
    return logits_table(rng.integers(0, n_c, n_e), logits, rng.random(n_e) < 0.5, np.zeros(n_e, bool), True)


def _rewrite_marker(root, model_id, **changes):
    path = os.path.join(root, "models", f"{model_id}.json")
    marker = json.load(open(path))
    marker.update(changes)
    for key in [k for k, v in changes.items() if v is ...]:
        del marker[key]
    with open(path, "w") as fh:
        json.dump(marker, fh)
    return marker


# --------------------------------------------------------------------------- 1. paths are derived
def test_model_id_pattern_matches_the_plan_and_nothing_else():
    unlearn = (UnlearnSpec("finetune", 2, {"lr": 0.01}), UnlearnSpec("my_pkg.methods:scrub", 1),
               UnlearnSpec("some/dir/my-file.py:forget_fn", 1))
    spec = dataclasses.replace(_spec(), unlearn=unlearn, counts={"original": 2, "retrain": 3, "shadow": 4})
    split = np.array(["train"] * 40 + ["test"] * 10)
    plan = make_plan(spec, split, np.arange(50) % 3)
    ids = [j.model_id for j in plan.jobs]
    assert "unlearned-my_pkg.methods.scrub-" in " ".join(ids) and "unlearned-my_file.forget_fn-" in " ".join(ids)
    assert all(is_model_id(m) for m in ids)
    for bad in ["../original-00000", "original-0", "original-00000.json", "Original-00000", "retrain-0000x",
                "model-00000", "unlearned-finetune-77143F41-00000", "unlearned-fine-tune-77143f41-00000",
                "unlearned-.-77143f41-00000", "unlearned-a/b-77143f41-00000", "shadow-00001\n", "", None, 7]:
        assert not is_model_id(bad), bad


def test_reader_never_follows_a_path_from_a_marker(tmp_path, caplog):
    store, _ = _small_store(tmp_path / "run")
    store.write_model("shadow-00000", _table(0), {"role": "shadow"})
    store.write_model("shadow-00001", _table(1), {"role": "shadow"})
    # a file outside the store that a tampered marker points at, with a matching checksum
    outside = tmp_path / "outside.parquet"
    outside.write_bytes((tmp_path / "run" / "logits" / "shadow-00001.parquet").read_bytes())
    data = outside.read_bytes()
    tampered = _rewrite_marker(tmp_path / "run", "shadow-00000", logits="../outside.parquet",
                               sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    caplog.set_level(logging.WARNING, "ufarm")
    reader = RunStore(str(tmp_path / "run"))
    assert sorted(reader.markers()) == ["shadow-00001"]
    (line,) = _warnings(caplog)
    assert "models/shadow-00000.json records logits path '../outside.parquet', not logits/shadow-00000.parquet" \
        in line
    assert sorted(reader.verified_models()) == ["shadow-00001"]
    assert reader.read_conf().model_ids == ["shadow-00001"]
    with pytest.raises(StoreError, match="model shadow-00000: its marker records logits path"):
        reader.read_logits("shadow-00000", tampered)
    with pytest.raises(StoreError, match="is not a model id"):
        reader.read_logits("../outside", {**tampered, "model_id": "../outside"})


def test_marker_whose_id_disagrees_with_its_file_is_damaged(tmp_path, caplog):
    store, _ = _small_store(tmp_path / "run")
    store.write_model("shadow-00000", _table(0), {"role": "shadow"})
    models = tmp_path / "run" / "models"
    shutil.copy(models / "shadow-00000.json", models / "shadow-00001.json")  # says model_id shadow-00000
    _rewrite_marker(tmp_path / "run", "shadow-00000", role="retrain")
    store.write_model("retrain-00000", _table(2), {"role": "retrain"})
    caplog.set_level(logging.WARNING, "ufarm")
    assert sorted(RunStore(str(tmp_path / "run")).markers()) == ["retrain-00000"]
    (line,) = _warnings(caplog)
    assert "2 damaged or foreign entries" in line
    assert "models/shadow-00001.json has model_id 'shadow-00000', which disagrees with its file name" in line
    assert "models/shadow-00000.json has role 'retrain', which disagrees with its model id" in line


def test_the_reports_catalog_names_damage_in_models_and_logits_in_one_line(tmp_path, caplog):
    store, _ = _small_store(tmp_path / "run")
    store.write_model("shadow-00000", _table(0), {"role": "shadow"})
    store.write_model("shadow-00001", _table(1), {"role": "shadow"})
    (tmp_path / "run" / "models" / "retrain-00000.json").write_text("[]")
    (tmp_path / "run" / "logits" / "notes.txt").write_text("hello")
    with open(tmp_path / "run" / "logits" / "shadow-00001.parquet", "r+b") as fh:
        fh.truncate(100)
    caplog.set_level(logging.WARNING, "ufarm")
    markers, intact = RunStore(str(tmp_path / "run")).catalog()
    assert sorted(markers) == ["shadow-00000", "shadow-00001"] and sorted(intact) == ["shadow-00000"]
    (line,) = _warnings(caplog)
    assert "2 damaged or foreign entries" in line and "models/retrain-00000.json" in line \
        and "logits/notes.txt" in line


def test_s3_marker_pointing_into_another_store_is_not_followed(bucket, caplog):
    a, _ = _small_store(f"s3://{bucket}/runs/a")
    b, _ = _small_store(f"s3://{bucket}/runs/b")
    a.write_model("shadow-00000", _table(0), {"role": "shadow"})
    theirs = b.write_model("shadow-00000", _table(1), {"role": "shadow"})
    marker = a.read_json("models/shadow-00000.json")
    a.write_json("models/shadow-00000.json", {**marker, "logits": "../b/logits/shadow-00000.parquet",
                                              "sha256": theirs["sha256"], "bytes": theirs["bytes"]})
    caplog.set_level(logging.WARNING, "ufarm")
    reader = RunStore(f"s3://{bucket}/runs/a")
    assert reader.markers() == {}
    assert "records logits path '../b/logits/shadow-00000.parquet'" in _warnings(caplog)[0]


# ------------------------------------------------------------------ 2. damaged entries never brick
def test_damaged_entries_are_named_once_and_the_rest_works(base_run, tmp_path, caplog):
    from evaluation.report import evaluate_store

    uri = _copy(base_run, tmp_path)
    models = os.path.join(uri, "models")
    with open(os.path.join(models, "shadow-00000.json"), "r+") as fh:  # truncated JSON
        fh.truncate(100)
    _rewrite_marker(uri, "shadow-00001", sha256=..., bytes=...)  # a marker missing required fields
    with open(os.path.join(models, "retrain-00007.json"), "w") as fh:
        fh.write("[]")
    with open(os.path.join(models, "report.json"), "w") as fh:  # a foreign, non-marker JSON
        json.dump({"lira": {"auc": 0.5}}, fh)
    os.makedirs(os.path.join(models, "report"))  # a report folder written into models/
    with open(os.path.join(models, "report", "report.md"), "w") as fh:
        fh.write("# report\n")
    with open(os.path.join(uri, "logits", "notes.txt"), "w") as fh:
        fh.write("x")
    os.makedirs(os.path.join(uri, "failed"))
    with open(os.path.join(uri, "failed", "shadow-00000.json"), "w") as fh:
        fh.write('{"error": ')
    caplog.set_level(logging.WARNING, "ufarm")

    s = summarize(RunStore(uri))
    assert s["roles"]["shadow"] == {"planned": 2, "done": 0, "missing": 2, "failed": 0}
    assert s["roles"]["retrain"]["done"] == 2 and s["roles"]["unlearned"]["done"] == 2
    lines = _warnings(caplog)
    assert len(lines) == 2  # one for models/ and logits/, one for failed/
    for needle in ("models/shadow-00000.json is not valid JSON", "models/shadow-00001.json has no valid sha256",
                   "models/retrain-00007.json is not a JSON object but list",
                   "models/report.json is not named <model id>.json", "models/report is a folder",
                   "logits/notes.txt is not named <model id>.parquet"):
        assert needle in lines[0], needle
    assert "failed/shadow-00000.json is not valid JSON" in lines[1]
    assert all("\n" not in line for line in lines)

    caplog.clear()
    rep = evaluate_store(uri, out=str(tmp_path / "report"), n_boot=0, max_examples=20, progress=False)
    assert list(rep["methods"]) == ["finetune-77143f41"]
    assert len(_warnings(caplog)) <= 2

    caplog.clear()
    prep = prepare_run(_spec(), uri)
    assert sorted(j.model_id for j in prep.pending) == ["shadow-00000", "shadow-00001"]
    result = run_local(prep, progress=False)
    assert sorted(result.trained) == ["shadow-00000", "shadow-00001"] and not result.failed
    assert sorted(RunStore(uri).intact_models()) == TINY_IDS
    # the retrained models are the same models, byte for byte
    for mid in ("shadow-00000", "shadow-00001"):
        with open(os.path.join(base_run, "logits", f"{mid}.parquet"), "rb") as a, \
                open(os.path.join(uri, "logits", f"{mid}.parquet"), "rb") as b:
            assert a.read() == b.read()


# ------------------------------------------------------------------------------ 3. checksums
def test_weights_checksum_recorded_and_checked(tmp_path, caplog):
    store, _ = _small_store(tmp_path / "run")
    marker = store.write_model("original-00000", _table(0), {"role": "original"}, weights=b"weights-bytes")
    assert marker["weights"] == "weights/original-00000.pt"
    assert marker["weights_sha256"] == hashlib.sha256(b"weights-bytes").hexdigest() and marker["weights_bytes"] == 13
    assert store.read_weights("original-00000", store.marker("original-00000")) == b"weights-bytes"
    slim = store.write_model("shadow-00000", _table(1), {"role": "shadow"})
    assert slim["weights"] is None and slim["weights_sha256"] is None
    with pytest.raises(StoreError, match="model shadow-00000 has no stored weights"):
        store.read_weights("shadow-00000", slim)
    (tmp_path / "run" / "weights" / "original-00000.pt").write_bytes(b"weights-bytez")  # same size
    with pytest.raises(StoreError, match=r"model original-00000: weights file weights/original-00000.pt fails "
                                         r"its checksum .*ufarm run --verify"):
        store.read_weights("original-00000", marker)
    caplog.set_level(logging.WARNING, "ufarm")
    assert sorted(store.intact_models()) == ["original-00000", "shadow-00000"]  # the cheap check: logits only
    assert sorted(store.verified_models()) == ["shadow-00000"]
    assert "weights/original-00000.pt fails its checksum" in _warnings(caplog)[0]


def test_damaged_parent_weights_fail_unlearning_and_verify_retrains_them(base_run, tmp_path):
    uri = _copy(base_run, tmp_path)
    path = os.path.join(uri, "weights", "original-00000.pt")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    for mid in TINY_IDS[-2:]:
        os.remove(os.path.join(uri, "models", f"{mid}.json"))
    result = run_local(prepare_run(_spec(), uri), progress=False)
    assert sorted(result.failed) == TINY_IDS[-2:]
    assert all("weights file weights/original-00000.pt fails its checksum" in e for e in result.failed.values())
    prep = prepare_run(_spec(), uri, verify=True)
    assert sorted(j.model_id for j in prep.pending) == ["original-00000"] + TINY_IDS[-2:]
    result = run_local(prep, progress=False)
    assert not result.failed and sorted(RunStore(uri).verified_models()) == TINY_IDS
    assert open(path, "rb").read() == open(os.path.join(base_run, "weights", "original-00000.pt"), "rb").read()


def test_projected_reads_fetch_only_the_used_columns_and_check_their_pages(tmp_path):
    store, _ = _small_store(tmp_path / "run", n_e=4000, n_q=2)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 2, 10)).astype(np.float32)
    table = logits_table(rng.integers(0, 10, 4000), logits, rng.random(4000) < 0.5, np.zeros(4000, bool), True)
    marker = store.write_model("shadow-00000", table, {"role": "shadow"})
    assert marker["page_checksums"] is True
    cols = ["conf", "trained_on", "forgotten"]
    reader = RunStore(str(tmp_path / "run"))
    reader.fs = counter = CountingFS()
    projected = reader.read_logits("shadow-00000", marker, columns=cols)
    whole = RunStore(str(tmp_path / "run")).read_logits("shadow-00000", marker, columns=cols, whole_file=True)
    assert projected.equals(whole)
    md = pq.ParquetFile(str(tmp_path / "run" / "logits" / "shadow-00000.parquet")).metadata.row_group(0)
    used = sum(md.column(i).total_compressed_size for i in range(md.num_columns) if md.column(i).path_in_schema in cols)
    # the used columns' pages and the file's last FOOTER_TAIL bytes (its footer), nothing else
    assert used <= counter.read <= used + run_store.FOOTER_TAIL and counter.read < marker["bytes"] / 3
    # a flipped byte inside conf's page: the projected read names it; the sha256 read too
    path = tmp_path / "run" / "logits" / "shadow-00000.parquet"
    conf = next(md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema == "conf")
    data = bytearray(path.read_bytes())
    data[conf.data_page_offset + 1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="fails its page checksums .*ufarm run --verify. retrains it"):
        RunStore(str(tmp_path / "run")).read_logits("shadow-00000", marker, columns=cols)
    with pytest.raises(StoreError, match="fails its checksum"):
        RunStore(str(tmp_path / "run")).read_logits("shadow-00000", marker, columns=cols, whole_file=True)
    # a file from before page checksums (no marker flag) is read whole and checked against its sha256
    with pytest.raises(StoreError, match="fails its checksum"):
        RunStore(str(tmp_path / "run")).read_logits("shadow-00000", {**marker, "page_checksums": None}, columns=cols)
    # a file of another size than its marker says
    path.write_bytes(bytes(data) + b"x")
    with pytest.raises(StoreError, match="has .* bytes, its marker"):
        RunStore(str(tmp_path / "run")).read_logits("shadow-00000", marker, columns=cols)


def test_examples_checksum_in_manifest_and_checked(tmp_path):
    store, _ = _small_store(tmp_path / "run")
    manifest = store.read_manifest()
    data = (tmp_path / "run" / "examples.parquet").read_bytes()
    assert manifest["examples_sha256"] == hashlib.sha256(data).hexdigest()
    assert store.read_examples().num_rows == 20
    other = examples_table(np.array(["train"] * 20), np.ones(20, int), None, np.zeros(20, bool))
    pq.write_table(other, tmp_path / "run" / "examples.parquet")
    with pytest.raises(StoreError, match=r"examples.parquet fails its checksum .*ufarm run. rewrites it"):
        store.read_examples()
    # a manifest from before the checksum reads the file unchecked
    del manifest["examples_sha256"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    assert store.read_examples().column("label").to_pylist() == [1] * 20
    (tmp_path / "run" / "examples.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(StoreError, match="examples.parquet is not readable Parquet"):
        store.read_examples()


def test_run_rewrites_a_missing_or_damaged_examples_file(base_run, tmp_path, caplog):
    uri = _copy(base_run, tmp_path)
    path = os.path.join(uri, "examples.parquet")
    good = open(path, "rb").read()
    caplog.set_level(logging.WARNING, "ufarm")
    os.remove(path)
    with pytest.raises(StoreError, match="examples.parquet does not exist; `ufarm run` rewrites it"):
        summarize(RunStore(uri))
    assert not prepare_run(_spec(), uri).pending
    assert open(path, "rb").read() == good
    assert _warnings(caplog) == [f"store {uri}: examples.parquet was missing; rewrote it from the spec"]
    caplog.clear()
    table = pq.read_table(path)
    forget = np.asarray(table.column("forget").to_numpy(zero_copy_only=False)).copy()
    forget[:5] = ~forget[:5]
    pq.write_table(table.set_column(4, "forget", pa.array(forget)), path)  # valid Parquet, other content
    with pytest.raises(StoreError, match="examples.parquet fails its checksum"):
        summarize(RunStore(uri))
    prepare_run(_spec(), uri)
    assert open(path, "rb").read() == good
    assert "examples.parquet fails its checksum; rewrote it from the spec" in _warnings(caplog)[0]
    summarize(RunStore(uri))
    # an older manifest without the checksum: the file's content is compared with the spec's, then recorded
    caplog.clear()
    manifest = json.load(open(os.path.join(uri, "manifest.json")))
    del manifest["examples_sha256"]
    json.dump(manifest, open(os.path.join(uri, "manifest.json"), "w"))
    pq.write_table(table.set_column(4, "forget", pa.array(forget)), path)
    prepare_run(_spec(), uri)
    assert "examples.parquet differed from the spec's examples; rewrote it" in _warnings(caplog)[0]
    assert RunStore(uri).read_manifest()["examples_sha256"] == hashlib.sha256(good).hexdigest()


# ----------------------------------------------------------------------------------- 4. S3 URIs
@pytest.mark.parametrize("uri,rule", [
    ("s3://b/a//x", "path component ''"), ("s3://b/./x", "path component '.'"),
    ("s3://b/a/../x", "path component '..'"), ("s3://b/..", "path component '..'"),
    ("s3://./x", "path component '.'"), ("s3://b/a#x", "contains '#'"), ("s3://b/a?x=1", "contains '?'"),
])
def test_s3_uri_components_are_checked_before_anything(uri, rule, tiny_spec_file, capsys):
    with pytest.raises(StoreError) as info:
        RunStore(uri)
    assert str(info.value).startswith(f"store URI '{uri}'") and rule in str(info.value)
    assert main(["run", str(tiny_spec_file), "--store", uri, "--executor", "local", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ufarm: error: store URI '{uri}'") and err.count("\n") == 1


def test_plain_s3_uris_still_accepted():
    assert RunStore("s3://bucket/runs/a/").root == "bucket/runs/a"
    assert RunStore("s3://bucket").root == "bucket"
    assert RunStore("s3://my.bucket/a.b/c_d-e").root == "my.bucket/a.b/c_d-e"


# ----------------------------------------------------------------------------- 5. format_version
def test_format_version_other_than_1_is_refused(base_run, tmp_path, capsys):
    from evaluation.report import evaluate_store

    uri = _copy(base_run, tmp_path)
    mpath = os.path.join(uri, "manifest.json")
    manifest = json.load(open(mpath))
    json.dump({**manifest, "format_version": 2}, open(mpath, "w"))
    with pytest.raises(StoreError, match="manifest.json has format_version 2; this ufarm reads format_version 1"):
        summarize(RunStore(uri))
    with pytest.raises(StoreError, match="format_version 2"):
        evaluate_store(uri, progress=False)
    assert main(["status", uri]) == 2
    err = capsys.readouterr().err
    assert "format_version 2" in err and err.count("\n") == 1
    # absent: the first stores, read as format 1
    json.dump({k: v for k, v in manifest.items() if k != "format_version"}, open(mpath, "w"))
    assert summarize(RunStore(uri))["roles"]["shadow"]["done"] == 2
    check_compatible(RunStore(uri).read_manifest(), manifest, uri)
    open(mpath, "w").write("{not json")
    with pytest.raises(StoreError, match="manifest.json is not valid JSON"):
        summarize(RunStore(uri))


# -------------------------------------------------------------------------------------- 6. lease
def test_second_run_on_a_leased_store_refuses_and_deletes_nothing(tiny_spec_file, tmp_path, capsys):
    uri = str(tmp_path / "run")
    first = RunStore(uri)
    with first.lease():
        in_flight = tmp_path / "run" / "logits" / f".tmp-{first.token}-0000abcd-shadow-00000.parquet"
        first.write_bytes("logits/keep.txt", b"x")  # the first run's folder exists, with a file in it
        in_flight.write_bytes(b"half written")
        assert main(["run", str(tiny_spec_file), "--store", uri, "--executor", "local", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"store {uri} is leased by another run (host {socket.gethostname()!r}, pid {os.getpid()}" in err
        assert in_flight.exists()  # the first run's in-flight file is untouched
        assert not (tmp_path / "run" / "manifest.json").exists()
        with pytest.raises(StoreError, match="is leased by another run"):  # run_local takes it too
            run_local(PreparedRun(_spec(), RunStore(uri), None, None, {}), progress=False)
    assert not (tmp_path / "run" / ".lease").exists()
    assert not in_flight.exists()  # released: the first run removed its own temporaries


def test_lease_released_on_every_exit(tmp_path, monkeypatch):
    from farm.train.engine import Engine

    uri = str(tmp_path / "run")
    lease = tmp_path / "run" / ".lease"
    store = RunStore(uri)
    for error in (KeyboardInterrupt, StoreError, ValueError):
        with pytest.raises(error):
            with store.lease():
                holder = json.loads(lease.read_text())
                assert holder["pid"] == os.getpid() and holder["token"] == store.token
                raise error("stop")
        assert not lease.exists()
    with store.lease(), store.lease():  # re-entrant on one RunStore
        pass
    assert not lease.exists()

    def interrupted(self, jobs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "run_batch", interrupted)
    prep = prepare_run(_spec(), uri)
    with pytest.raises(KeyboardInterrupt):
        run_local(prep, progress=False)
    assert not lease.exists()


def test_stale_local_lease_is_taken_over_and_a_live_one_refused(base_run, tmp_path, caplog):
    uri = _copy(base_run, tmp_path)
    code = ("import sys; from farm.store import RunStore; s = RunStore(sys.argv[1]); l = s.lease(); "
            "l.__enter__(); print(s.token, flush=True); sys.stdin.read()")
    # a live holder in another process: refused, naming it
    proc = subprocess.Popen([sys.executable, "-c", code, uri], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        token = proc.stdout.readline().strip()
        with pytest.raises(StoreError, match=f"leased by another run .*pid {proc.pid},"):
            prepare_run(_spec(), uri)
        dead_tmp = os.path.join(uri, "logits", f".tmp-{token}-00000000-shadow-00000.parquet")
        open(dead_tmp, "wb").write(b"half")
        other_tmp = os.path.join(uri, "logits", ".tmp-0123456789abcdef-00000000-shadow-00001.parquet")
        open(other_tmp, "wb").write(b"half")
    finally:
        proc.kill()  # dies holding the lease
        proc.wait()
    caplog.set_level(logging.WARNING, "ufarm")
    prep = prepare_run(_spec(), uri)
    (line,) = _warnings(caplog)
    assert f"took over the lease of a dead run (host {socket.gethostname()!r}, pid {proc.pid}" in line
    assert f"its process {proc.pid} is no longer running); removed 1 of its temporary files" in line
    assert not os.path.exists(dead_tmp) and os.path.exists(other_tmp)
    assert not run_local(prep, progress=False).trained
    assert not os.path.exists(os.path.join(uri, ".lease"))
    # a lease held from another host cannot be judged: refused, with the way out
    with open(os.path.join(uri, ".lease"), "w") as fh:
        json.dump({"host": "elsewhere", "pid": 1, "token": "0" * 16, "started_at": "2020-01-01T00:00:00+00:00"}, fh)
    with pytest.raises(StoreError, match=f"host 'elsewhere', pid 1.*if that run is dead, delete {uri}/.lease"):
        prepare_run(_spec(), uri)


RACER = """
import sys, time
from farm.store import RunStore, StoreError
s = RunStore(sys.argv[1])
while time.time() < float(sys.argv[2]):
    pass
try:
    with s.lease():
        print("HELD", flush=True)
        time.sleep(2)
except StoreError:
    print("REFUSED", flush=True)
"""


def test_racing_takers_of_a_dead_lease_end_with_one_holder(tmp_path):
    """Four runs find the same dead lease at the same moment: exactly one takes it, the others refuse."""
    uri = str(tmp_path / "run")
    os.makedirs(uri)
    for _ in range(3):
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        with open(os.path.join(uri, ".lease"), "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": int(dead), "token": "0" * 16,
                       "started_at": "2020-01-01T00:00:00+00:00"}, fh)
        start = time.time() + 1.5  # every racer is up and spinning by then
        procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(start)], cwd=REPO, stdout=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outs == ["HELD", "REFUSED", "REFUSED", "REFUSED"], outs
        assert not os.path.exists(os.path.join(uri, ".lease"))


def test_every_executor_and_tune_hold_the_lease(base_run, tmp_path):
    """The data-parallel executor and a whole tune search write the store too: a leased store refuses them."""
    from farm.run.data_parallel import run_distributed
    from farm.run.tune import run_search

    uri = _copy(base_run, tmp_path)
    prep = prepare_run(_spec(counts={"original": 1, "retrain": 3, "shadow": 2}), uri)
    assert prep.pending
    tune = {"method": "finetune", "search": "grid", "params": {"lr": [0.01]}, "models": 2}
    with RunStore(uri).lease():
        with pytest.raises(StoreError, match="is leased by another run"):
            run_distributed(prep, 2, use_gpu=False, progress=False)
        with pytest.raises(StoreError, match="is leased by another run"):
            run_search(_spec(tune=tune), uri, progress=False)


def test_s3_second_run_refuses(bucket, tiny_spec_file, capsys):
    import boto3

    uri = f"s3://{bucket}/runs/a"
    with RunStore(uri).lease():
        assert main(["run", str(tiny_spec_file), "--store", uri, "--executor", "local", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"store {uri} is leased by another run (host {socket.gethostname()!r}, pid {os.getpid()}" in err
        assert err.count("\n") == 1
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert keys == ["runs/a/.lease"]  # nothing else written
    assert boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # released


def test_s3_lease_is_renewed_and_an_expired_one_taken_over(bucket, monkeypatch, caplog):
    import boto3

    monkeypatch.setenv("UFARM_LEASE_SECONDS", "1.5")  # renewed every 0.375 s
    uri = f"s3://{bucket}/run"
    with RunStore(uri).lease():
        time.sleep(2.5)  # longer than the ttl: only the renewals keep it
        with pytest.raises(StoreError, match="is leased by another run"):
            with RunStore(uri).lease():
                pass
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key="run/.lease", Body=json.dumps(
        {"host": "elsewhere", "pid": 1, "token": "0" * 16, "started_at": "x", "ttl_seconds": 1}).encode())
    time.sleep(2.2)
    caplog.set_level(logging.WARNING, "ufarm")
    taker = RunStore(uri)
    with taker.lease():
        assert json.loads(client.get_object(Bucket=bucket, Key="run/.lease")["Body"].read())["token"] == taker.token
    assert "took over an expired lease (host 'elsewhere', pid 1" in _warnings(caplog)[0]
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_ray_workers_name_temporaries_with_the_runs_token(tmp_path):
    """A worker's RunStore (another instance, or another process) uses the lease's token, so the run's
    cleanup finds its workers' temporaries."""
    uri = str(tmp_path / "run")
    run = RunStore(uri)
    with run.lease():
        worker = RunStore(uri)
        assert worker._temporary_token() == run.token
    assert RunStore(uri)._temporary_token() != run.token
