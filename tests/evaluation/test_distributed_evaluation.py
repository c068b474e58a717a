"""evaluate_store by chunks of examples: any chunk size, and Ray tasks instead of the in-process map, give the
report of a single chunk to the bit (report.json but its seconds, the per-example Parquet tables, the figures);
a membership job reads only its rows."""
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.report import evaluate_store
from evaluation.report.chunks import MembershipJob, membership_job
from evaluation.report.membership import chunk_setup, shadow_setup
from evaluation.report.store_io import model_set, open_run, read_footers, read_membership
from farm.cli import main
from farm.store import RunStore, StoreError, examples_table, logits_table, run_store
from farm.store.layout import ROW_GROUP_EXAMPLES
from synthetic_store import build_store
from tests.conftest import CountingFS, assert_same_report, report_files, ufarm

ONE_CHUNK = 10 ** 9
UNLEARNED_NAN = "unlearned-nullmethod-0000beef-00002"
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN original
KW = dict(n_boot=4, progress=False)  # max_examples: the default 1000, as the CLI


def _write(store: RunStore, mid: str, conf: np.ndarray, trained: np.ndarray, role: str, parent=None):
    """A model whose conf is ``conf``[E, Q] exactly (2 classes, label 0)."""
    n_e, n_q = conf.shape
    logits = np.zeros((n_e, n_q, 2), np.float32)
    logits[..., 0] = conf
    store.write_model(mid, logits_table(np.zeros(n_e, int), logits, trained, np.zeros(n_e, bool), False),
                      {"role": role, "parent": parent, "accuracy": {"retain": 0.9, "test": 0.8, "train": 0.9,
                                                                    "forget": 0.8, "val": None},
                       "train_seconds": 1.0, "seconds": 1.0})


def _originals(uri: str, n: int, nan_in: int | None = None):
    """``n`` original models (the parents of the synthetic unlearned ones), one with NaN conf if asked."""
    store = RunStore(uri)
    m = store.read_manifest()
    n_e, n_q = m["n_examples"], len(m["spec"]["queries"])
    train = np.asarray(store.read_examples().column("split").to_numpy(zero_copy_only=False)) == "train"
    for i in range(n):
        conf = np.random.default_rng([9, i]).normal(2, 1, (n_e, n_q)).astype(np.float32)
        if i == nan_in:
            conf[[5, 17], 0] = np.nan
        _write(store, f"original-{i:05d}", conf, train, "original")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    out = {}
    # 8 shadows: variance "global", pooled over every example; examples 0..599 train, 600..799 test
    out["global"] = str(root / "global")
    build_store(out["global"], n_train=600, n_test=200, n_forget=30, n_shadow=8, n_retrain=8, n_unlearned=8,
                n_originals=4, gap=0.7, n_q=2, unlearned_shift=1.0, seed=5)
    _originals(out["global"], 4, nan_in=2)
    # 64 shadows in pairs: per-example variances
    out["per_example"] = str(root / "per_example")
    build_store(out["per_example"], n_train=500, n_test=150, n_forget=20, n_shadow=64, n_retrain=8, n_unlearned=8,
                n_originals=8, gap=0.7, n_q=2, unlearned_shift=1.0, seed=6)
    # a shadow with NaN conf: left out, so its partner has none and the shadows are matched at random
    out["nan_shadow"] = str(root / "nan_shadow")
    build_store(out["nan_shadow"], n_train=400, n_test=100, n_forget=20, n_shadow=10, n_retrain=6, n_unlearned=6,
                n_originals=6, gap=0.7, n_q=1, unlearned_shift=1.0, seed=7)
    store = RunStore(out["nan_shadow"])
    bad = store.read_conf(["shadow-00003"])
    conf = bad.conf[0].copy()
    conf[450, 0] = np.inf  # a test example: found by the chunk that holds it
    _write(store, "shadow-00003", conf, bad.trained_on[0], "shadow")
    unl = store.read_conf([UNLEARNED_NAN])
    conf = unl.conf[0].copy()
    conf[30, 0] = np.nan
    _write(store, UNLEARNED_NAN, conf, unl.trained_on[0], "unlearned", parent="original-00002")
    return out


@pytest.fixture(scope="module")
def one_chunk(stores, tmp_path_factory):
    """Every store evaluated in one chunk, in this process."""
    root = tmp_path_factory.mktemp("one")
    out = {}
    for name, uri in stores.items():
        evaluate_store(uri, out=str(root / name), chunk_examples=ONE_CHUNK, **KW)
        out[name] = report_files(str(root / name))
    return out


@pytest.mark.parametrize("name", ["global", "per_example", "nan_shadow"])
def test_small_chunks_give_the_report_of_one_chunk(stores, one_chunk, name, tmp_path):
    rep = evaluate_store(stores[name], out=str(tmp_path / "r"), chunk_examples=100, **KW)
    assert_same_report(report_files(str(tmp_path / "r")), one_chunk[name])
    lira = rep["lira"]
    if name == "global":
        assert lira["variance"] == "global" and [b["model_id"] for b in rep["nonfinite"]] == ["original-00002"]
        assert rep["nonfinite"][0]["first_example_ids"] == [5, 17]
    elif name == "per_example":
        assert lira["variance"] == "per_example" and lira["n_usable_shadows"] == 64
    else:
        bad, unl = rep["nonfinite"]
        assert bad["model_id"] == "shadow-00003" and bad["first_example_ids"] == [450]
        assert unl["model_id"] == UNLEARNED_NAN and unl["first_example_ids"] == [30]
        assert next(iter(rep["methods"].values()))["n_unlearned"] == 5
        assert lira["n_usable_shadows"] == 9 and lira["note"].startswith("1 shadow(s) left out")
        assert lira["references"].startswith("the shadows are not all in complementary pairs")
        assert "message" in lira["rmia"]


def test_ray_tasks_give_the_report_of_one_process(stores, one_chunk, ray_address, tmp_path):
    from farm.run.evaluate_ray import ray_map

    seen = []

    def recording(fn, args):
        seen.append((fn.__name__, len(args)))
        return ray_map()(fn, args)

    evaluate_store(stores["per_example"], out=str(tmp_path / "ray"), map_chunks=recording, chunk_examples=200, **KW)
    assert_same_report(report_files(str(tmp_path / "ray")), one_chunk["per_example"])
    assert ("membership_job", 4) in seen and ("read_job", 2) in seen
    # each attack's ROC in buckets of about a membership job's cells (64 shadows x 200 examples, of 500 train), and
    # RMIA's counts in blocks of as many cells (3 blocks of targets)
    assert [n for name, n in seen if name == "roc_bucket_job"] == [3, 3, 3, 3] and ("rmia_counts_rows", 3) in seen
    # a forgetting score per job: F_null's 4 draws (n_boot), F's 8 jackknife replicates, the equal-count F's 4 draws
    assert [n for name, n in seen if name == "stat_job"] == [4, 8, 4]


def test_ray_tasks_open_an_s3_store_by_its_uri(ray_address, bucket, tmp_path):
    """Each task opens the store itself (workers take credentials from their own environment)."""
    from farm.run.evaluate_ray import ray_map

    uri = f"s3://{bucket}/run"
    build_store(uri, n_train=300, n_test=100, n_forget=10, n_shadow=4, n_retrain=4, n_unlearned=4, n_originals=4,
                gap=0.7, n_q=1, seed=8)
    evaluate_store(uri, out=str(tmp_path / "here"), chunk_examples=ONE_CHUNK, **KW)
    evaluate_store(uri, out=str(tmp_path / "ray"), map_chunks=ray_map(), chunk_examples=150, **KW)
    assert_same_report(report_files(str(tmp_path / "ray")), report_files(str(tmp_path / "here")))


def test_cli_executor_ray_gives_the_report_of_one_process(stores, one_chunk, ray_address, tmp_path):
    r = ufarm("evaluate", stores["global"], "--out", tmp_path / "cli", "--executor", "ray", "--chunk-examples", "200",
              "--n-boot", "4", "--no-progress", env={"RAY_ADDRESS": ray_address})
    assert r.returncode == 0, r.stderr
    assert "LiRA online: AUC" in r.stdout
    assert_same_report(report_files(str(tmp_path / "cli")), one_chunk["global"])


def test_ray_tasks_get_the_settings_but_no_credentials(ray_address, monkeypatch):
    import ray

    from evaluation.report.chunks import chunk_ranges
    from farm.run.evaluate_ray import ray_map
    from farm.settings import SECRET_ENV

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-value-never-forwarded")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    seen, real = [], ray.remote

    def spy(**options):
        seen.append(options)
        return real(**options)

    monkeypatch.setattr(ray, "remote", spy)
    assert ray_map()(chunk_ranges, [(10, 4), (3, 5)]) == [[(0, 4), (4, 8), (8, 10)], [(0, 3)]]
    (options,) = seen
    env = options["runtime_env"]["env_vars"]
    assert options["num_cpus"] == 1 and env["AWS_REGION"] == "eu-west-1"
    assert not set(SECRET_ENV) & set(env) and "secret-value-never-forwarded" not in repr(options)


def _count_store_reads(monkeypatch) -> list[CountingFS]:
    """Every RunStore the evaluation opens (evaluation.report.store_io's) counts the bytes it reads into a
    CountingFS of the returned list."""
    counters = []

    class Counted(RunStore):
        def __init__(self, uri):
            super().__init__(uri)
            self.fs = CountingFS()
            counters.append(self.fs)

    monkeypatch.setattr("evaluation.report.store_io.RunStore", Counted)
    return counters


def test_a_membership_job_reads_only_its_rows(tmp_path, monkeypatch):
    uri = str(tmp_path / "run")
    n_e = 4 * ROW_GROUP_EXAMPLES
    store = RunStore(uri)
    manifest = {"format_version": 1, "spec": {"name": "t", "queries": ["plain"]}, "identity": "x",
                "identity_fields": {"seed": 0}, "dataset": {"name": "d", "fingerprint": "f" * 64},
                "n_examples": n_e, "n_classes": 2}
    store.init_run(manifest, examples_table(np.array(["train"] * n_e), np.zeros(n_e, int), None, np.zeros(n_e, bool)))
    rng = np.random.default_rng(0)
    half = rng.random(n_e) < 0.5
    for k in range(4):
        _write(store, f"shadow-{k:05d}", rng.normal(size=(n_e, 1)).astype(np.float32), half ^ bool(k % 2), "shadow")
    run = open_run(uri)
    ids = run.by_role["shadow"]
    setup = shadow_setup(ids, read_membership(run, ids))
    mds = [pq.ParquetFile(os.path.join(uri, "logits", f"{m}.parquet")).metadata for m in ids]
    used = [sum(md.row_group(g).column(i).total_compressed_size for md in mds for i in range(md.num_columns)
                if md.row_group(g).column(i).path_in_schema in ("conf", "trained_on")) for g in range(4)]
    counters = _count_store_reads(monkeypatch)

    def job_bytes(start, stop, footers=None):
        counters.clear()
        cs = chunk_setup(setup, slice(start, stop), {"in": 1.0, "out": 1.0}, 0.3, workers=1)
        part = membership_job(MembershipJob(model_set(run, ids), start, stop, np.arange(stop - start),
                                            np.arange(0), "scores", cs), footers)
        assert part.scores.scores["online"].shape == (4, stop - start) and part.peak_rss_mb > 0
        return sum(c.read for c in counters)

    small, group, two = job_bytes(0, 200), job_bytes(ROW_GROUP_EXAMPLES, 2 * ROW_GROUP_EXAMPLES), \
        job_bytes(0, 2 * ROW_GROUP_EXAMPLES)
    # the used columns' pages of the row groups read, each file's tail (its footer), the manifest, and between
    # two row groups a gap under 8 KiB that Arrow's coalescing of ranged reads fills rather than make a request
    tails = 4 * run_store.FOOTER_TAIL + os.path.getsize(os.path.join(uri, "manifest.json"))
    assert used[1] < group <= used[1] + tails
    assert used[0] + used[1] < two <= used[0] + used[1] + tails + 4 * 8192
    assert abs(small - group) < 4 * 1024  # a chunk inside one row group reads that row group
    # with the footers the driver read once (evaluate_store shares them with every chunk's job): the pages alone
    footers = read_footers(model_set(run, ids))
    manifest = os.path.getsize(os.path.join(uri, "manifest.json"))
    assert used[1] < job_bytes(ROW_GROUP_EXAMPLES, 2 * ROW_GROUP_EXAMPLES, footers) <= used[1] + manifest


def test_ray_map_puts_what_jobs_share_once():
    from farm.run.evaluate_ray import shared_once

    shared, own, arr = {"a": b"x"}, [1, 2], np.zeros(3)
    puts = []
    out = shared_once([(shared, own, 7, arr), (shared, [3], 7, arr[:2]), (shared, None, 7, arr)],
                      lambda v: puts.append(v) or f"ref{len(puts)}")
    assert puts == [shared, arr]  # each shared container once; scalars, None and one-job objects as they are
    assert out == [("ref1", own, 7, "ref2"), ("ref1", [3], 7, out[1][3]), ("ref1", None, 7, "ref2")]


def test_verify_reads_each_file_whole_once_and_names_a_damaged_one(stores, tmp_path, monkeypatch):
    uri = str(tmp_path / "run")
    shutil.copytree(stores["global"], uri)
    counters = _count_store_reads(monkeypatch)

    def evaluate(name: str, verify: bool) -> int:
        counters.clear()
        evaluate_store(uri, out=str(tmp_path / name), chunk_examples=ONE_CHUNK, verify=verify, **KW)
        return sum(c.read for c in counters)

    plain, verified = evaluate("plain", False), evaluate("verified", True)
    assert_same_report(report_files(str(tmp_path / "verified")), report_files(str(tmp_path / "plain")))
    logits = os.path.join(uri, "logits")
    assert verified - plain == sum(os.path.getsize(os.path.join(logits, f)) for f in os.listdir(logits))

    # a byte of a column the evaluation does not read: only --verify's sha256 sees it
    path = os.path.join(logits, "shadow-00001.parquet")
    md = pq.ParquetFile(path).metadata
    pred = next(md.row_group(0).column(i) for i in range(md.num_columns)
                if md.row_group(0).column(i).path_in_schema == "pred")
    data = bytearray(open(path, "rb").read())
    data[pred.data_page_offset + 40] ^= 0xFF
    open(path, "wb").write(bytes(data))
    evaluate("damaged", False)
    with pytest.raises(StoreError, match=r"model shadow-00001: logits file .* fails its checksum"):
        evaluate("damaged-verified", True)


def test_bad_chunk_size_is_one_line(stores, capsys):
    assert main(["evaluate", stores["global"], "--chunk-examples", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ufarm: error: --chunk-examples must be >= 1, got 0"]
    with pytest.raises(ValueError, match="chunk_examples must be a whole number >= 1"):
        evaluate_store(stores["global"], chunk_examples=0, progress=False)
