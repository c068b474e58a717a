"""The run store: Parquet logits and JSON markers under one URI (a local folder, file://, or s3://).

Layout and guarantees are the contract in docs/store.md (format_version 1):
- a model exists only when models/<model_id>.json (its marker) exists, and the marker is written last;
- no reader ever sees a partial file: local writes go to a temporary name in the same folder and are
  renamed; S3 writes are one PUT (or one completed multipart upload), which S3 makes visible atomically;
- the marker carries the sha256, size and row count of the logits file, so corruption is detected.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .confidence import logit_scaled_confidence

FORMAT_VERSION = 1
TMP_TAG = ".tmp-"
READ_THREADS = min(16, 2 * (os.cpu_count() or 1))  # Arrow and hashlib release the GIL


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message is one line and names the store or model."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _s3_filesystem(region: str | None = None) -> tuple[pafs.S3FileSystem, str]:
    """An S3 filesystem from the standard AWS environment, with bounded retries and timeouts so an
    unreachable endpoint fails in seconds instead of retrying for minutes."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = dict(
        region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        connect_timeout=float(os.environ.get("UFARM_S3_CONNECT_TIMEOUT", 3)),
        request_timeout=float(os.environ.get("UFARM_S3_REQUEST_TIMEOUT", 60)),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("UFARM_S3_ATTEMPTS", 4))),
    )
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs), endpoint or "AWS S3"


TRANSIENT = ("SLOW_DOWN", "SlowDown", "Throttl", "503", "RequestTimeout", "InternalError", "ServiceUnavailable")


def _retry_transient(fn, what: str):
    """Call fn, retrying S3 throttling and transient server errors with exponential back-off (on top of
    the SDK's own few attempts, which a sustained SlowDown outlasts). Other errors pass through at once."""
    attempts = int(os.environ.get("UFARM_S3_RETRIES", 8))
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or not any(t in str(exc) for t in TRANSIENT) \
                    or attempt == attempts - 1:
                raise
            delay = min(8.0, 0.25 * 2 ** attempt)  # deterministic: no jitter, runs stay reproducible
            logging.getLogger("ufarm").warning("%s: %s; retrying in %.2f s", what, _first_line(exc), delay)
            time.sleep(delay)


@dataclass
class StoreConf:
    """What the reader returns for a set of models: conf[models, examples, queries] and its metadata."""
    model_ids: list[str]
    roles: np.ndarray  # str [M]
    conf: np.ndarray  # float32 [M, E, Q]
    trained_on: np.ndarray  # bool [M, E]
    forgotten: np.ndarray  # bool [M, E]
    example_ids: np.ndarray  # int32 [E]
    markers: list[dict] = field(repr=False)


class RunStore:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if uri != "/" else uri
        parsed = urlparse(uri)
        self.is_s3 = parsed.scheme == "s3"
        if self.is_s3:
            if not parsed.netloc:
                raise StoreError(f"store URI {uri!r} names no bucket; use s3://bucket/prefix")
            self.fs, self.endpoint = _s3_filesystem()
            self.bucket = parsed.netloc
            self.root = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        elif parsed.scheme in ("", "file"):
            path = parsed.path if parsed.scheme == "file" else uri
            self.fs, self.endpoint = pafs.LocalFileSystem(), None
            self.root = os.path.abspath(os.path.expanduser(path))
        else:
            raise StoreError(f"store URI {uri!r} has scheme {parsed.scheme!r}; use a local path, file:// or s3://")

    # ------------------------------------------------------------------------------------ primitives
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def check_reachable(self) -> None:
        """Fail early and clearly: an unreachable endpoint, a missing bucket, or a local path that is a file."""
        if self.is_s3:
            try:
                info = self.fs.get_file_info(self.bucket)
            except OSError as exc:
                raise StoreError(f"cannot reach the S3 store {self.uri} at {self.endpoint}: {_first_line(exc)}") from None
            if info.type == pafs.FileType.NotFound:
                raise StoreError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint} (store {self.uri})")
        elif os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"store path {self.root} exists and is not a folder")

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def write_bytes(self, rel: str, data: bytes | pa.Buffer) -> None:
        """Atomic from a reader's point of view (see the module docstring). data: any bytes-like object."""
        target = self.path(rel)
        if self.is_s3:
            def put():
                with self.fs.open_output_stream(target) as out:
                    out.write(data)
            return _retry_transient(put, f"writing {self.uri}/{rel}")
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/{TMP_TAG}{uuid.uuid4().hex}-{os.path.basename(target)}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)  # atomic: a reader sees the old state or the whole file

    def read_bytes(self, rel: str) -> bytes:
        def get():
            with self.fs.open_input_file(self.path(rel)) as fh:
                return fh.read()
        try:
            return _retry_transient(get, f"reading {self.uri}/{rel}") if self.is_s3 else get()
        except FileNotFoundError:
            raise StoreError(f"{self.uri}/{rel} does not exist") from None

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())

    def read_json(self, rel: str) -> dict:
        return json.loads(self.read_bytes(rel))

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def list_dir(self, rel: str) -> list[pafs.FileInfo]:
        """Files directly under a folder of the store, without temporaries; [] when the folder is absent."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File and not i.base_name.startswith(TMP_TAG)]

    def remove_temporaries(self) -> int:
        """Delete temporaries that a killed writer left behind (local stores only; S3 never has them)."""
        if self.is_s3:
            return 0
        removed = 0
        for sub in ("", "logits", "models", "weights", "failed"):
            folder = self.path(sub) if sub else self.root
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(TMP_TAG):
                        os.remove(os.path.join(folder, name))
                        removed += 1
        return removed

    # ------------------------------------------------------------------------------- run identity
    def read_manifest(self) -> dict | None:
        return self.read_json("manifest.json") if self.exists("manifest.json") else None

    def read_examples(self) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes("examples.parquet")))

    def init_run(self, manifest: dict, examples: pa.Table) -> None:
        """Create the run, or check that the store already holds this run and record the latest spec.

        A store made from another dataset or another spec identity is refused before anything is written.
        """
        old = self.read_manifest()
        if old is not None:
            check_compatible(old, manifest, self.uri)
            if old.get("spec") != manifest["spec"]:
                self.write_json("manifest.json", {**old, "spec": manifest["spec"]})
            return
        if self.list_dir("models"):
            raise StoreError(f"store {self.uri} has models but no manifest.json; it was not made by ufarm")
        buf = io.BytesIO()
        pq.write_table(examples, buf)
        self.write_bytes("examples.parquet", buf.getvalue())
        self.write_json("manifest.json", manifest)  # last: a store without a manifest is not a run yet

    # --------------------------------------------------------------------------------- models
    def markers(self) -> dict[str, dict]:
        """model_id -> marker for every committed model (read in parallel: on S3 each is a GET)."""
        infos = [i for i in self.list_dir("models") if i.base_name.endswith(".json")]
        with ThreadPoolExecutor(max_workers=16) as pool:
            markers = list(pool.map(lambda i: self.read_json(f"models/{i.base_name}"), infos))
        return {m["model_id"]: m for m in markers}

    def logits_sizes(self) -> dict[str, int]:
        return {i.base_name[: -len(".parquet")]: i.size for i in self.list_dir("logits")
                if i.base_name.endswith(".parquet")}

    def intact_models(self) -> dict[str, dict]:
        """Markers whose logits file exists with the recorded size: a cheap check (one listing) that
        catches deleted or truncated files; the sha256 is checked when a file is read."""
        sizes = self.logits_sizes()
        return {mid: m for mid, m in self.markers().items() if sizes.get(mid) == m.get("bytes")}

    def verified_models(self) -> dict[str, dict]:
        """Markers whose logits file matches the recorded sha256 (reads every file; `ufarm run --verify`)."""
        intact = self.intact_models()

        def ok(item):
            mid, marker = item
            return hashlib.sha256(self.read_bytes(marker["logits"])).hexdigest() == marker["sha256"]

        with ThreadPoolExecutor(max_workers=8) as pool:
            keep = list(pool.map(ok, intact.items()))
        return {mid: m for (mid, m), good in zip(intact.items(), keep) if good}

    def write_model(self, model_id: str, table: pa.Table, marker: dict, weights: bytes | None = None) -> dict:
        """Weights, then the logits file, then the marker (the commit). Returns the marker written."""
        if weights is not None:
            self.write_bytes(f"weights/{model_id}.pt", weights)
        data = parquet_bytes(table)
        self.write_bytes(f"logits/{model_id}.parquet", data)
        marker = {**marker, "model_id": model_id, "logits": f"logits/{model_id}.parquet",
                  "sha256": hashlib.sha256(data).hexdigest(), "bytes": data.size, "rows": table.num_rows,
                  "weights": f"weights/{model_id}.pt" if weights is not None else None,
                  "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.write_json(f"models/{model_id}.json", marker)
        self.delete(f"failed/{model_id}.json")
        return marker

    def read_weights(self, model_id: str) -> bytes:
        return self.read_bytes(f"weights/{model_id}.pt")

    def read_logits(self, model_id: str, marker: dict, columns: list[str] | None = None,
                    verify: bool = True) -> pa.Table:
        data = self.read_bytes(marker["logits"])
        if verify:
            digest = hashlib.sha256(data).hexdigest()
            if digest != marker["sha256"]:
                raise StoreError(f"model {model_id}: logits file {marker['logits']} fails its checksum "
                                 f"(marker {marker['sha256'][:12]}, file {digest[:12]}); `ufarm run` retrains it")
        # one thread per file: callers read many files from a thread pool, which parallelises better
        return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)

    def read_conf(self, model_ids: list[str] | None = None, roles: tuple[str, ...] | None = None,
                  verify: bool = True) -> StoreConf:
        """conf[models, examples, queries] (float32) with roles and per-example membership, for the given
        models (default: every committed model, optionally only some roles), in model-id order."""
        markers = self.markers()
        if model_ids is None:
            model_ids = sorted(m for m, mk in markers.items() if roles is None or mk["role"] in roles)
        missing = [m for m in model_ids if m not in markers]
        if missing:
            raise StoreError(f"store {self.uri} has no model(s) {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
        manifest = self.read_manifest()
        n_q = len(manifest["spec"]["queries"])
        n_e = manifest["n_examples"]
        m = len(model_ids)
        # filled in place by the readers: no per-model copies to stack at the end
        conf = np.empty((m, n_e, n_q), np.float32)
        trained_on = np.empty((m, n_e), bool)
        forgotten = np.empty((m, n_e), bool)

        def load(i_mid):
            i, mid = i_mid
            t = self.read_logits(mid, markers[mid], columns=["conf", "trained_on", "forgotten"], verify=verify)
            if t.num_rows != n_e * n_q:
                raise StoreError(f"model {mid}: logits file has {t.num_rows} rows, the run has {n_e} x {n_q}")
            conf[i] = t.column("conf").to_numpy().reshape(n_e, n_q)
            trained_on[i] = t.column("trained_on").to_numpy()[::n_q]
            forgotten[i] = t.column("forgotten").to_numpy()[::n_q]

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            list(pool.map(load, enumerate(model_ids)))
        return StoreConf(
            model_ids=list(model_ids),
            roles=np.array([markers[i]["role"] for i in model_ids], dtype=object),
            conf=conf, trained_on=trained_on, forgotten=forgotten,
            example_ids=np.arange(n_e, dtype=np.int32),
            markers=[markers[i] for i in model_ids],
        )

    # ------------------------------------------------------------------------------- failures
    def write_failure(self, model_id: str, info: dict) -> None:
        self.write_json(f"failed/{model_id}.json", {**info, "model_id": model_id})

    def failures(self) -> dict[str, dict]:
        return {i.base_name[: -len(".json")]: self.read_json(f"failed/{i.base_name}")
                for i in self.list_dir("failed") if i.base_name.endswith(".json")}


def check_compatible(old: dict, new: dict, uri: str) -> None:
    if old.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"store {uri} has format_version {old.get('format_version')}; this ufarm reads {FORMAT_VERSION}")
    if old["identity"] != new["identity"]:
        changed = sorted(k for k in new["identity_fields"] if old["identity_fields"].get(k) != new["identity_fields"][k])
        raise StoreError(f"store {uri} holds another spec ({old['spec'].get('name')!r}); fields that differ: "
                         f"{', '.join(changed) or 'unknown'}; use another store")
    if old["dataset"]["fingerprint"] != new["dataset"]["fingerprint"]:
        raise StoreError(f"store {uri} holds a run on other data ({old['dataset']['name']}, fingerprint "
                         f"{old['dataset']['fingerprint'][:12]}), not {new['dataset']['name']} "
                         f"{new['dataset']['fingerprint'][:12]}; use another store")

def logits_table(labels: np.ndarray, logits: np.ndarray, trained_on: np.ndarray, forgotten: np.ndarray,
                 keep_logits: bool) -> pa.Table:
    """One row per (example, query), example-major: row e * Q + q. logits is float32 [E, Q, C].

    Every field is declared non-nullable (no column ever holds a null): Parquet then stores no definition
    levels, which makes both encoding and decoding cheaper (docs/benchmarks.md, the store benchmark); the
    types are the contract's either way."""
    n_e, n_q, n_c = logits.shape
    conf = logit_scaled_confidence(logits, labels[:, None]).astype(np.float32)
    columns = {
        "example_id": pa.array(np.repeat(np.arange(n_e, dtype=np.int32), n_q)),
        "query": pa.array(np.tile(np.arange(n_q, dtype=np.int8), n_e)),
        "conf": pa.array(conf.reshape(-1)),
        "pred": pa.array(logits.argmax(-1).astype(np.int16).reshape(-1)),
        "trained_on": pa.array(np.repeat(trained_on, n_q)),
        "forgotten": pa.array(np.repeat(forgotten, n_q)),
    }
    if keep_logits:
        flat = pa.array(np.ascontiguousarray(logits, dtype=np.float32).reshape(-1))
        columns["logits"] = pa.FixedSizeListArray.from_arrays(flat, n_c)
    schema = pa.schema([pa.field(name, array.type, nullable=False) for name, array in columns.items()])
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """A logits table as Parquet bytes, with encodings chosen by measurement (docs/store.md): example ids,
    sorted, delta-packed; the alternating query column Snappy-compressed; everything else plain, with no
    dictionaries and no compression (random floats do not compress; a dictionary for pred saves 0.5 MB a
    file at 70,000 x 2 rows but costs more time in encoding than it saves in hashing and writing)."""
    present = set(table.column_names)
    encoding = {c: "PLAIN" for c in ("query", "conf", "pred", "trained_on", "forgotten") if c in present}
    encoding["example_id"] = "DELTA_BINARY_PACKED"
    compression = {c: "none" for c in present}
    compression["query"] = "snappy"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, use_dictionary=False, column_encoding=encoding,
                   write_statistics=False)
    return sink.getvalue()


def examples_table(split: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, forget: np.ndarray) -> pa.Table:
    n = len(labels)
    return pa.table({
        "example_id": pa.array(np.arange(n, dtype=np.int32)),
        "split": pa.array(split.astype(str)),
        "label": pa.array(labels.astype(np.int16)),
        "group": pa.array(groups.astype(np.int32) if groups is not None else [None] * n, type=pa.int32()),
        "forget": pa.array(forget.astype(bool)),
    })


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
