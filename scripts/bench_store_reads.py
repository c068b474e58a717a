"""What an evaluation reads per model: whole logits files checked against their sha256 (the baseline, and
`--verify`) against the columns the evaluation uses, each page checked against its CRC-32.

    .venv/bin/python scripts/bench_store_reads.py [--models 64] [--examples 70000]

Writes M models of E examples x 2 queries with keep_logits (10 classes) to a local folder and to a loopback
S3 server (moto), then reads conf, trained_on and forgotten of every model both ways, three times each, and
prints bytes fetched per model and seconds, with the ratios. Bytes are counted where the store's
filesystem hands them out.

Then a whole evaluation from S3: `evaluate_store` of the S3 store (its models are shadows in complementary
pairs, as the membership section wants them) by chunks of 8192 examples (the default), without and with
--verify (every file first read whole once against its sha256), with the bytes every RunStore of the
evaluation fetched, per model, beside the bytes of the columns it uses (conf and trained_on).  With fewer
than 64 shadows LiRA pools one variance over every example, which takes a first pass over the columns before
the scoring pass: the default 64 models make one pass.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from farm.store import RunStore, examples_table, logits_table  # noqa: E402


class CountingFS:
    """Wraps a pyarrow filesystem: counts the bytes its input files hand out."""

    def __init__(self, inner):
        self.inner, self.read = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_input_file(self, path):
        import io

        owner, f = self, self.inner.open_input_file(path)

        class Counting(io.RawIOBase):
            def readinto(self, buf):
                data = f.read(len(buf))
                owner.read += len(data)
                buf[: len(data)] = data
                return len(data)

            def seek(self, pos, whence=0):
                return f.seek(pos, whence)

            def tell(self):
                return f.tell()

            def readable(self):
                return True

            def seekable(self):
                return True

        return pa.PythonFile(Counting(), mode="r")


def fill(uri: str, n_models: int, n_e: int) -> None:
    store = RunStore(uri)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n_e)
    split = np.where(np.arange(n_e) < n_e * 6 // 7, "train", "test")
    manifest = {"format_version": 1, "spec": {"name": "bench", "queries": ["plain", "hflip"]}, "identity": "x",
                "identity_fields": {}, "dataset": {"name": "synthetic", "fingerprint": "0" * 64},
                "n_examples": n_e, "n_classes": 10}
    store.init_run(manifest, examples_table(split, labels, None, np.zeros(n_e, bool)))
    train = split == "train"
    for i in range(n_models):
        logits = rng.normal(size=(n_e, 2, 10)).astype(np.float32)
        if i % 2 == 0:  # complementary pairs of shadows over the train split
            half = train & (rng.random(n_e) < 0.5)
        trained = half if i % 2 == 0 else train & ~half
        store.write_model(f"shadow-{i:05d}", logits_table(labels, logits, trained, np.zeros(n_e, bool), True),
                          {"role": "shadow"})


def measure(uri: str, whole_file: bool, repeats: int = 3) -> tuple[float, float, float]:
    """(median seconds, bytes per model, mean file bytes per model) of read_conf over every model."""
    times, per_model = [], 0.0
    for _ in range(repeats):
        store = RunStore(uri)
        store.fs = counter = CountingFS(store.fs)
        markers = store.markers()
        t0 = time.perf_counter()
        sc = store.read_conf(whole_file=whole_file)
        times.append(time.perf_counter() - t0)
        per_model = counter.read / len(sc.model_ids)
    file_bytes = statistics.mean(m["bytes"] for m in markers.values())
    return statistics.median(times), per_model, file_bytes


def used_column_bytes(uri: str) -> float:
    """Mean compressed bytes per model of the columns an evaluation of shadows reads: conf and trained_on."""
    import pyarrow.parquet as pq

    store = RunStore(uri)
    sizes = []
    for mid in store.markers():
        with store.fs.open_input_file(store.path(f"logits/{mid}.parquet")) as fh:
            md = pq.ParquetFile(fh).metadata
        sizes.append(sum(md.row_group(g).column(c).total_compressed_size for g in range(md.num_row_groups)
                         for c in range(md.num_columns)
                         if md.row_group(g).column(c).path_in_schema in ("conf", "trained_on")))
    return statistics.mean(sizes)


def measure_evaluation(uri: str, out: str, verify: bool) -> tuple[float, float]:
    """(seconds, bytes per model) of evaluate_store(uri): every RunStore the evaluation opens counts its bytes."""
    import farm.store.filesystem as store_fs
    from evaluation.report import evaluate_store

    counters, make = [], store_fs.s3_filesystem

    def counting(*args, **kw):
        fs, endpoint = make(*args, **kw)
        counters.append(CountingFS(fs))
        return counters[-1], endpoint

    store_fs.s3_filesystem = counting
    try:
        t0 = time.perf_counter()
        rep = evaluate_store(uri, out=out, progress=False, verify=verify)
        seconds = time.perf_counter() - t0
    finally:
        store_fs.s3_filesystem = make
    return seconds, sum(c.read for c in counters) / rep["models"]["shadow"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--examples", type=int, default=70_000)
    args = ap.parse_args()
    from moto.server import ThreadedMotoServer  # a test dependency: only this benchmark needs it
    import boto3

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="bench-reads")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-reads-") as tmp:
            for where, uri in (("local", os.path.join(tmp, "run")), ("S3 (moto)", "s3://bench-reads/run")):
                fill(uri, args.models, args.examples)
                base_s, base_b, size = measure(uri, whole_file=True)
                proj_s, proj_b, _ = measure(uri, whole_file=False)
                print(f"{where}: {args.models} models x {args.examples:,} examples x 2 queries, keep_logits "
                      f"(file {size / 1e6:.2f} MB)")
                print(f"  whole files + sha256 : {base_b / 1e6:6.3f} MB read per model, {base_s:6.2f} s")
                print(f"  used columns + CRC-32: {proj_b / 1e6:6.3f} MB read per model, {proj_s:6.2f} s")
                print(f"  ratio: {base_b / proj_b:.1f}x fewer bytes, {base_s / proj_s:.2f}x faster")
            uri = "s3://bench-reads/run"
            used = used_column_bytes(uri)
            whole_s, whole_b = measure_evaluation(uri, os.path.join(tmp, "report-verify"), verify=True)
            chunk_s, chunk_b = measure_evaluation(uri, os.path.join(tmp, "report"), verify=False)
            print(f"evaluate_store from S3 (moto), {args.models} shadows x {args.examples:,} examples; the columns "
                  f"it uses (conf, trained_on): {used / 1e6:.3f} MB per model")
            print(f"  chunks of 8192, pages against CRC-32: {chunk_b / 1e6:6.3f} MB read per model, {chunk_s:6.2f} s "
                  f"({chunk_b / used:.3f}x the columns used)")
            print(f"  --verify (each file whole once too) : {whole_b / 1e6:6.3f} MB read per model, {whole_s:6.2f} s "
                  f"({whole_b / size:.3f}x the file, {(whole_b - chunk_b) / size:.3f}x for the sha256 pass)")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
