"""`ufarm export` (farm/export.py): the LiRA reference code's layout and the wide Parquet table, read back
the way their consumers read them, checked value by value against the store; bad input refused with one
line and nothing left behind."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from farm import export
from farm.export import add_parser, export_lira, export_wide
from farm.store import RunStore, StoreError, examples_table, logits_table

N_TRAIN, N_TEST, N_Q, N_C = 14, 6, 2, 3


def _store(root, n_shadow=4, n_retrain=2, n_original=1, seed=0):
    """A run without training: random logits; shadows in complementary pairs over the train split, retrain
    models on the retain set, originals on the train split (the roles' membership as docs/store.md says)."""
    rng = np.random.default_rng(seed)
    n_e = N_TRAIN + N_TEST
    split = np.array(["train"] * N_TRAIN + ["test"] * N_TEST)
    labels = rng.integers(0, N_C, n_e)
    forget = np.zeros(n_e, bool)
    forget[[1, 4, 9]] = True
    manifest = {"format_version": 1, "spec": {"name": "t", "queries": ["plain", "hflip"][:N_Q],
                                              "training": {"epochs": 7}},
                "identity": "x", "identity_fields": {"seed": 0}, "dataset": {"name": "d", "fingerprint": "f" * 64},
                "n_examples": n_e, "n_classes": N_C}
    store = RunStore(str(root))
    store.init_run(manifest, examples_table(split, labels, None, forget))
    train = split == "train"
    models = []
    for pair in range(n_shadow // 2):
        half = np.zeros(n_e, bool)
        half[rng.permutation(N_TRAIN)[: N_TRAIN // 2]] = True
        models += [(f"shadow-{2 * pair:05d}", half), (f"shadow-{2 * pair + 1:05d}", train & ~half)]
    models += [(f"retrain-{i:05d}", train & ~forget) for i in range(n_retrain)]
    models += [(f"original-{i:05d}", train) for i in range(n_original)]
    for k, (mid, trained) in enumerate(models):
        logits = rng.normal(size=(n_e, N_Q, N_C)).astype(np.float32)
        forgotten = forget if mid.startswith("retrain") else np.zeros(n_e, bool)
        store.write_model(mid, logits_table(labels, logits, trained, forgotten, False),
                          {"role": mid.split("-")[0], "seed": k})
    return store


def _stored(store, mid):
    return store.read_logits(mid, store.marker(mid)).to_pydict()


def _listing(folder):
    return sorted(os.listdir(folder))


def _plot_py_load_data(p):
    """plot.py's load_data, re-implemented: every folder named experiment* with a scores/ folder, its last
    score file in sorted order and its keep.npy, stacked; keep cut to the scores' example count."""
    scores, keep = [], []
    for root, dirs, _ in os.walk(p):
        for f in dirs:
            if not f.startswith("experiment") or not os.path.exists(os.path.join(root, f, "scores")):
                continue
            last = sorted(os.listdir(os.path.join(root, f, "scores")))
            if not last:
                continue
            scores.append(np.load(os.path.join(root, f, "scores", last[-1])))
            keep.append(np.load(os.path.join(root, f, "keep.npy")))
    scores = np.array(scores)
    return scores, np.array(keep)[:, : scores.shape[1]]


# ------------------------------------------------------------------------------------- LiRA
def test_lira_layout_holds_keep_and_scores_of_every_shadow(tmp_path):
    store = _store(tmp_path / "run", n_shadow=4)
    result = export_lira(str(tmp_path / "run"), str(tmp_path / "exp" / "digits"), progress=False)
    dest = tmp_path / "exp" / "digits"
    assert result["models"] == 4 and result["examples"] == N_TRAIN and result["queries"] == N_Q
    assert result["model_ids"] == [f"shadow-{i:05d}" for i in range(4)] and result["skipped"] == []
    assert _listing(dest) == ["README.txt", "example_ids.npy"] + [f"experiment-{i}_4" for i in range(4)] \
        + ["y_train.npy"]
    examples = store.read_examples()
    train = np.flatnonzero(examples.column("split").to_numpy(zero_copy_only=False) == "train")
    np.testing.assert_array_equal(np.load(dest / "example_ids.npy"), train)
    np.testing.assert_array_equal(np.load(dest / "y_train.npy"), examples.column("label").to_numpy()[train])
    for i in range(4):
        folder = dest / f"experiment-{i}_4"
        mid = f"shadow-{i:05d}"
        assert _listing(folder) == ["hparams.json", "keep.npy", "scores"]
        assert _listing(folder / "scores") == ["0000000007.npy"]  # the run's epochs, 10 digits
        hparams = json.loads((folder / "hparams.json").read_text())
        assert hparams["model_id"] == mid and hparams["expid"] == i and hparams["num_experiments"] == 4
        rows = _stored(store, mid)
        keep, scores = np.load(folder / "keep.npy"), np.load(folder / "scores" / "0000000007.npy")
        assert keep.dtype == bool and keep.shape == (N_TRAIN,)
        assert scores.dtype == np.float32 and scores.shape == (N_TRAIN, N_Q)
        for j, e in enumerate(train):  # row by row against the stored rows (row = e * Q + q)
            assert keep[j] == rows["trained_on"][e * N_Q]
            for q in range(N_Q):
                assert rows["example_id"][e * N_Q + q] == e and rows["query"][e * N_Q + q] == q
                assert scores[j, q] == np.float32(rows["conf"][e * N_Q + q])
    readme = (dest / "README.txt").read_text()
    assert readme.startswith(export.LIRA_HEADER) and "experiment-3_4  shadow-00003" in readme
    assert f"ln -s {dest} exp/cifar10" in readme


def test_plot_py_load_data_reads_the_export_and_every_example_is_in_and_out(tmp_path):
    _store(tmp_path / "run", n_shadow=6)
    export_lira(str(tmp_path / "run"), str(tmp_path / "lira"), progress=False)
    scores, keep = _plot_py_load_data(str(tmp_path / "lira"))
    assert scores.shape == (6, N_TRAIN, N_Q) and keep.shape == (6, N_TRAIN) and keep.dtype == bool
    # complementary pairs: every example IN for exactly half; plot.py holds the last model out and takes
    # the median of IN and OUT scores per example over the rest, which needs both for every example
    assert (keep.sum(0) == 3).all()
    assert (keep[:-1].sum(0) >= 1).all() and ((~keep[:-1]).sum(0) >= 1).all()
    conf = RunStore(str(tmp_path / "run")).read_conf(roles=("shadow",))
    walked = [d for _, dirs, _ in os.walk(tmp_path / "lira") for d in dirs if d.startswith("experiment")]
    by_id = {json.load(open(tmp_path / "lira" / d / "hparams.json"))["model_id"]: k for k, d in enumerate(walked)}
    assert len(by_id) == 6
    for m, mid in enumerate(conf.model_ids):
        np.testing.assert_array_equal(scores[by_id[mid]], conf.conf[m, :N_TRAIN])
        np.testing.assert_array_equal(keep[by_id[mid]], conf.trained_on[m, :N_TRAIN])


def test_lira_exports_only_intact_shadows_and_names_a_damaged_one(tmp_path, caplog):
    _store(tmp_path / "run", n_shadow=6)
    logits = tmp_path / "run" / "logits"
    with open(logits / "shadow-00002.parquet", "r+b") as fh:  # truncated: not intact, not committed
        fh.truncate(100)
    data = bytearray((logits / "shadow-00004.parquet").read_bytes())  # same size, another sha256
    data[len(data) // 2] ^= 0xFF
    (logits / "shadow-00004.parquet").write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, "ufarm")
    result = export_lira(str(tmp_path / "run"), str(tmp_path / "lira"), progress=False)
    assert result["model_ids"] == ["shadow-00000", "shadow-00001", "shadow-00003", "shadow-00005"]
    assert result["skipped"] == ["shadow-00004"]
    (line,) = [r.getMessage() for r in caplog.records if "shadow-00004" in r.getMessage()]
    # a byte flipped in a page the export reads: its CRC-32 names the file
    assert "model shadow-00004: logits file logits/shadow-00004.parquet fails its page checksums" in line
    assert line.endswith("; left out of the export")
    assert sorted(d for d in os.listdir(tmp_path / "lira") if d.startswith("experiment")) == \
        [f"experiment-{i}_4" for i in range(4)]
    assert json.loads((tmp_path / "lira" / "experiment-2_4" / "hparams.json").read_text())["model_id"] == \
        "shadow-00003"


# ------------------------------------------------------------------------------------- wide
def _check_wide(path, store, model_ids):
    table = ds.dataset(str(path), format="parquet").to_table()
    n_e = N_TRAIN + N_TEST
    assert table.num_rows == len(model_ids) * n_e * N_Q
    assert table.schema.names == ["model_id", "role", "example_id", "query", "conf", "pred", "trained_on",
                                  "forgotten", "split", "label", "forget"]
    assert [str(t) for t in table.schema.types] == ["string", "string", "int32", "int8", "float", "int16", "bool",
                                                     "bool", "string", "int16", "bool"]
    got = table.to_pydict()
    assert got["model_id"] == [m for m in model_ids for _ in range(n_e * N_Q)]  # model-id order
    examples = store.read_examples().to_pydict()
    for k, mid in enumerate(model_ids):
        rows = _stored(store, mid)
        base = k * n_e * N_Q
        for r in range(n_e * N_Q):
            assert got["role"][base + r] == mid.split("-")[0]
            for col in ("example_id", "query", "conf", "pred", "trained_on", "forgotten"):
                assert got[col][base + r] == rows[col][r], (mid, r, col)
            e = rows["example_id"][r]
            assert (got["split"][base + r], got["label"][base + r], got["forget"][base + r]) == \
                (examples["split"][e], examples["label"][e], examples["forget"][e])
    return table


def test_wide_export_equals_the_store_row_by_row(tmp_path):
    store = _store(tmp_path / "run")
    result = export_wide(str(tmp_path / "run"), str(tmp_path / "out" / "all.parquet"), progress=False)
    ids = ["original-00000", "retrain-00000", "retrain-00001"] + [f"shadow-{i:05d}" for i in range(4)]
    assert result["model_ids"] == ids and result["rows"] == 7 * (N_TRAIN + N_TEST) * N_Q
    table = _check_wide(tmp_path / "out" / "all.parquet", store, ids)
    assert _listing(tmp_path / "out") == ["all.parquet"]  # no temporary left
    assert pq.ParquetFile(tmp_path / "out" / "all.parquet").metadata.num_row_groups == 7  # one per model
    frame = __import__("pandas").read_parquet(tmp_path / "out" / "all.parquet")
    assert len(frame) == table.num_rows and frame["conf"].dtype == np.float32
    assert frame.groupby("model_id")["trained_on"].sum().to_dict()["retrain-00000"] == (N_TRAIN - 3) * N_Q


def test_wide_role_filter(tmp_path):
    store = _store(tmp_path / "run")
    result = export_wide(str(tmp_path / "run"), str(tmp_path / "r.parquet"), roles=("retrain", "original"),
                         progress=False)
    assert result["roles"] == ["retrain", "original"]
    _check_wide(tmp_path / "r.parquet", store, ["original-00000", "retrain-00000", "retrain-00001"])
    with pytest.raises(StoreError, match=r"roles 'shadows': each must be one of original, retrain, shadow, "):
        export_wide(str(tmp_path / "run"), str(tmp_path / "s.parquet"), roles=["shadows"], progress=False)
    with pytest.raises(StoreError, match=r"has no committed models with role unlearned to export"):
        export_wide(str(tmp_path / "run"), str(tmp_path / "u.parquet"), roles=["unlearned"], progress=False)
    assert not (tmp_path / "s.parquet").exists() and not (tmp_path / "u.parquet").exists()


# ------------------------------------------------------------------------------------- bad input
def _nothing_but(folder, names):
    assert _listing(folder) == sorted(names)


def test_missing_or_foreign_store_is_refused(tmp_path):
    for fn, dest in ((export_lira, "lira"), (export_wide, "w.parquet")):
        with pytest.raises(StoreError, match=r"^store .*nowhere does not exist$"):
            fn(str(tmp_path / "nowhere"), str(tmp_path / dest), progress=False)
        (tmp_path / "plain").mkdir(exist_ok=True)
        with pytest.raises(StoreError, match=r"has no manifest.json; it is not a run store"):
            fn(str(tmp_path / "plain"), str(tmp_path / dest), progress=False)
    _nothing_but(tmp_path, ["plain"])


def test_no_shadows_for_lira_is_refused_and_nothing_is_created(tmp_path):
    _store(tmp_path / "run", n_shadow=0)
    with pytest.raises(StoreError, match=r"has no committed shadow models; the LiRA layout needs them"):
        export_lira(str(tmp_path / "run"), str(tmp_path / "a" / "b" / "lira"), progress=False)
    _nothing_but(tmp_path, ["run"])


def test_existing_destinations_are_refused_unless_force(tmp_path):
    _store(tmp_path / "run")
    run = str(tmp_path / "run")
    # lira: an empty folder is fine; a non-empty one is refused; --force replaces only an earlier export
    (tmp_path / "empty").mkdir()
    assert export_lira(run, str(tmp_path / "empty"), progress=False)["models"] == 4
    with pytest.raises(StoreError, match=r"empty is a non-empty folder; choose a new folder, or pass --force"):
        export_lira(run, str(tmp_path / "empty"), progress=False)
    (tmp_path / "empty" / "experiment-9_9").mkdir()  # a stale folder that the replacement must not keep
    export_lira(run, str(tmp_path / "empty"), progress=False, force=True)
    assert "experiment-9_9" not in os.listdir(tmp_path / "empty")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for force in (False, True):
        with pytest.raises(StoreError, match=r"mine is a non-empty folder"):
            export_lira(run, str(tmp_path / "mine"), progress=False, force=force)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"file exists and is not a folder"):
        export_lira(run, str(tmp_path / "file"), progress=False, force=True)
    # wide: an existing file only with force; a folder never
    (tmp_path / "w.parquet").write_text("old")
    with pytest.raises(StoreError, match=r"w.parquet already exists; choose a new file name, or pass --force"):
        export_wide(run, str(tmp_path / "w.parquet"), progress=False)
    assert (tmp_path / "w.parquet").read_text() == "old"
    export_wide(run, str(tmp_path / "w.parquet"), progress=False, force=True)
    assert pq.read_metadata(tmp_path / "w.parquet").num_rows == 7 * (N_TRAIN + N_TEST) * N_Q
    with pytest.raises(StoreError, match=r"mine is a folder; give a file name such as all.parquet"):
        export_wide(run, str(tmp_path / "mine"), progress=False, force=True)
    with pytest.raises(StoreError, match=r"is a URI; exports are written to a local path"):
        export_wide(run, "s3://bucket/all.parquet", progress=False)
    _nothing_but(tmp_path, ["empty", "file", "mine", "run", "w.parquet"])


@pytest.mark.parametrize("fmt", ["lira", "wide"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch, fmt, error):
    _store(tmp_path / "run")
    calls = []
    real = RunStore.read_logits

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise error("boom")
        return real(self, *a, **k)

    monkeypatch.setattr(RunStore, "read_logits", failing)
    dest = tmp_path / "new" / "deeper" / ("lira" if fmt == "lira" else "all.parquet")
    with pytest.raises(error):
        (export_lira if fmt == "lira" else export_wide)(str(tmp_path / "run"), str(dest), progress=False)
    _nothing_but(tmp_path, ["run"])  # the parents it created are gone too
    # and an earlier export at the destination survives a failed --force replacement
    monkeypatch.setattr(RunStore, "read_logits", real)
    (tmp_path / "keep").mkdir()
    dest = tmp_path / "keep" / ("lira" if fmt == "lira" else "all.parquet")
    (export_lira if fmt == "lira" else export_wide)(str(tmp_path / "run"), str(dest), progress=False)
    before = sorted(os.walk(dest)) if fmt == "lira" else dest.read_bytes()
    calls.clear()
    monkeypatch.setattr(RunStore, "read_logits", failing)
    with pytest.raises(error):
        (export_lira if fmt == "lira" else export_wide)(str(tmp_path / "run"), str(dest), progress=False, force=True)
    assert (sorted(os.walk(dest)) if fmt == "lira" else dest.read_bytes()) == before
    _nothing_but(tmp_path / "keep", [dest.name])


def test_a_write_error_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    _store(tmp_path / "run")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.np, "save", full)
    with pytest.raises(StoreError, match=r"^export to .*lira failed, nothing written: No space left on device$"):
        export_lira(str(tmp_path / "run"), str(tmp_path / "lira"), progress=False)
    _nothing_but(tmp_path, ["run"])


# ------------------------------------------------------------------------------------- command line
def test_cli_parses_runs_and_prints_one_line(tmp_path, capsys):
    from farm.cli import main

    _store(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--to", "lira", str(tmp_path / "lira"), "--no-progress"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"exported 4 shadow models x {N_TRAIN} train examples x {N_Q} queries to ")
    # the store as --store, like every other subcommand
    assert main(["export", "--to", "wide", str(tmp_path / "s.parquet"), "--store", str(tmp_path / "run"),
                 "--roles", "shadow,retrain", "--no-progress"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line == f"exported {6 * 20 * N_Q:,} rows (6 models x 20 examples x {N_Q} queries, roles shadow,retrain) " \
                   f"to {tmp_path / 's.parquet'}"
    assert main(["export", str(tmp_path / "run"), "--to", "lira", str(tmp_path / "l2"), "--roles", "shadow"]) == 2
    assert "--roles applies to --to wide" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--to", "csv", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "ufarm: error: --to 'csv': use one of lira, wide"
    assert main(["export", "--to", "wide", str(tmp_path / "y.parquet")]) == 2
    assert "needs a store: --store URI" in capsys.readouterr().err
    assert not (tmp_path / "l2").exists() and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run"), "--to", "wide", "x", "--roles", "ghost"])
    ap = argparse.ArgumentParser(prog="ufarm")
    help_text = add_parser(ap.add_subparsers()).format_help()
    assert "ufarm export runs/digits-demo --to lira exp/digits" in help_text
    assert "ufarm export runs/digits-demo --to wide all.parquet" in help_text


def test_module_imports_neither_ray_nor_torch():
    code = "import sys, farm.export; bad = [m for m in ('ray', 'torch') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.strip() == "[]"
