"""The run store: Parquet logits and JSON markers under one URI (a local folder, file://, or s3://).

Layout and guarantees are the contract in docs/store.md (format_version 1):
- a model exists only when models/<model_id>.json (its marker) exists, and the marker is written last;
- no reader ever sees a partial file (farm.store.filesystem writes atomically);
- the marker carries the sha256, size and row count of the logits file (and of the weights file), and the
  manifest the sha256 of examples.parquet, so corruption is detected;
- every key is derived from a validated model id under the store's own root: the paths written in a marker
  are informative and never followed; a damaged or foreign entry is named and treated as missing;
- one run writes a store at a time, under a lease (farm.store.lease).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .filesystem import StoreFiles, retry_transient
from .layout import (FORMAT_VERSION, StoreConf, StoreError, check_compatible, check_model_id, first_line, is_count,
                     is_model_id, marker_problem, parquet_bytes, printable_name, row_groups_covering, short)
from .lease import StoreLease

log = logging.getLogger("ufarm")
READ_THREADS = min(16, 2 * (os.cpu_count() or 1))  # Arrow and hashlib release the GIL
# Bytes read from a file's end for its footer in one request (a longer footer takes one more): Parquet's own
# reader takes 64 KiB, more than a chunk's columns of a small file; 70,000 examples' footer is 4.4 KB.
FOOTER_TAIL = 8 << 10


class RunStore(StoreFiles):
    """A run's store: its manifest and examples, the committed models (markers, logits, weights) and the
    failure records, read as untrusted input; written under the lease."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def lease(self):
        """Hold the store's lease for the body of a with-block (re-entrant on one RunStore); a StoreError
        naming the holder when another live run holds it. Released on every exit, removing this writer's
        temporaries."""
        if self._lease_depth:
            self._lease_depth += 1
            try:
                yield self
            finally:
                self._lease_depth -= 1
            return
        held = StoreLease(self).acquire()
        self._lease_depth = 1
        try:
            yield held
        finally:
            self._lease_depth = 0
            held.release()

    def _warn_damaged(self, entries: list[tuple[str, str]]) -> None:
        """Name damaged or foreign entries in one warning line (each once per RunStore)."""
        with self._lock:
            new = sorted({k: why for k, why in entries if k not in self._warned}.items())
            self._warned.update(k for k, _ in new)
        if not new:
            return
        shown = "; ".join(f"{printable_name(k)} {why}" for k, why in new[:10])
        more = f"; and {len(new) - 10} more" if len(new) > 10 else ""
        log.warning("store %s: %d damaged or foreign entr%s, treated as missing: %s%s", self.uri, len(new),
                    "y" if len(new) == 1 else "ies", shown, more)

    # ------------------------------------------------------------------------------- run identity
    def read_manifest(self) -> dict | None:
        """The manifest, or None when the store has none; a StoreError for one this ufarm cannot read
        (not JSON, lacking spec / n_examples / n_classes, or a format_version other than 1; an absent
        format_version is that of the first stores, 1)."""
        if not self.exists("manifest.json"):
            return None
        try:
            manifest = json.loads(self.read_bytes("manifest.json"))
        except (ValueError, RecursionError) as exc:
            raise StoreError(f"store {self.uri}: manifest.json is not valid JSON ({first_line(exc)})") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"store {self.uri}: manifest.json is not a JSON object")
        version = manifest.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise StoreError(f"store {self.uri}: manifest.json has format_version {short(version)}; this ufarm "
                             f"reads format_version {FORMAT_VERSION}")
        if not isinstance(manifest.get("spec"), dict) or not is_count(manifest.get("n_examples")) \
                or not is_count(manifest.get("n_classes")):
            raise StoreError(f"store {self.uri}: manifest.json lacks a valid spec, n_examples or n_classes")
        return manifest

    def read_examples(self, manifest: dict | None = None) -> pa.Table:
        """examples.parquet, checked against the manifest's examples_sha256 (manifests written before it
        have none and are read unchecked)."""
        want = (manifest if manifest is not None else self.read_manifest() or {}).get("examples_sha256")
        try:
            data = self.read_bytes("examples.parquet")
        except StoreError:
            raise StoreError(f"store {self.uri}: examples.parquet does not exist; `ufarm run` rewrites it") from None
        if want is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != want:
                raise StoreError(f"store {self.uri}: examples.parquet fails its checksum (manifest "
                                 f"{short(want, 15)}, file {digest[:12]}); `ufarm run` rewrites it")
        try:
            return pq.read_table(pa.BufferReader(data))
        except pa.ArrowException as exc:
            raise StoreError(f"store {self.uri}: examples.parquet is not readable Parquet ({first_line(exc)}); "
                             "`ufarm run` rewrites it") from None

    def _examples_problem(self, manifest: dict, expected: pa.Table) -> str | None:
        if not self.exists("examples.parquet"):
            return "was missing"
        try:
            table = self.read_examples(manifest)
        except StoreError as exc:
            return "fails its checksum" if "checksum" in str(exc) else "was not readable Parquet"
        if not table.equals(expected):
            return "differed from the spec's examples"
        return None

    def init_run(self, manifest: dict, examples: pa.Table) -> None:
        """Create the run, or check that the store already holds this run and record the latest spec.

        A store made from another dataset or another spec identity is refused before anything is written.
        A missing or damaged examples.parquet of an existing run is rewritten from the spec (it is a
        deterministic function of it) and said so in one warning line.
        """
        buf = io.BytesIO()
        pq.write_table(examples, buf)
        data = buf.getvalue()
        old = self.read_manifest()
        if old is not None:
            check_compatible(old, manifest, self.uri)
            new = {**old, "spec": manifest["spec"]}
            problem = self._examples_problem(old, examples)
            if problem:
                self.write_bytes("examples.parquet", data)
                new["examples_sha256"] = hashlib.sha256(data).hexdigest()
                log.warning("store %s: examples.parquet %s; rewrote it from the spec", self.uri, problem)
            elif "examples_sha256" not in old:  # a manifest from before the checksum: record the file's
                new["examples_sha256"] = hashlib.sha256(self.read_bytes("examples.parquet")).hexdigest()
            if new != old:
                self.write_json("manifest.json", new)
            return
        if self.list_dir("models"):
            raise StoreError(f"store {self.uri} has models but no manifest.json; it was not made by ufarm")
        self.write_bytes("examples.parquet", data)
        # last: a store without a manifest is not a run yet
        self.write_json("manifest.json", {**manifest, "examples_sha256": hashlib.sha256(data).hexdigest()})

    # --------------------------------------------------------------------------------- models
    def markers(self, _damaged: list | None = None) -> dict[str, dict]:
        """model_id -> marker for every committed model (read in parallel: on S3 each is a GET). Entries
        of models/ that are not usable markers are named in one warning line and left out."""
        damaged: list[tuple[str, str]] = [] if _damaged is None else _damaged
        candidates = []
        for info in self.entries("models"):
            name = info.base_name
            if info.type != pafs.FileType.File:
                damaged.append((f"models/{name}", "is a folder"))
            elif not (name.endswith(".json") and is_model_id(name[: -len(".json")])):
                damaged.append((f"models/{name}", "is not named <model id>.json"))
            else:
                candidates.append(name[: -len(".json")])

        def load(mid):
            try:
                data = self.read_bytes(f"models/{mid}.json")
            except StoreError:
                return mid, None, None  # removed since the listing
            try:
                marker = json.loads(data)
            except (ValueError, RecursionError) as exc:
                return mid, None, f"is not valid JSON ({first_line(exc)})"
            return mid, marker, marker_problem(mid, marker)

        with ThreadPoolExecutor(max_workers=16) as pool:
            loaded = list(pool.map(load, candidates))
        good = {}
        for mid, marker, problem in loaded:
            if problem:
                damaged.append((f"models/{mid}.json", problem))
            elif marker is not None:
                good[mid] = marker
        if _damaged is None:
            self._warn_damaged(damaged)
        return good

    def marker(self, model_id: str) -> dict:
        """One model's marker, checked as markers() checks it; a StoreError naming the model otherwise."""
        rel = f"models/{check_model_id(model_id)}.json"
        try:
            data = self.read_bytes(rel)
        except StoreError:
            raise StoreError(f"store {self.uri} has no model {model_id} (no {rel})") from None
        try:
            marker = json.loads(data)
        except (ValueError, RecursionError):
            raise StoreError(f"model {model_id}: {rel} is not valid JSON; `ufarm run` retrains it") from None
        problem = marker_problem(model_id, marker)
        if problem:
            raise StoreError(f"model {model_id}: {rel} {problem}; `ufarm run` retrains it")
        return marker

    def logits_sizes(self, _damaged: list | None = None) -> dict[str, int]:
        """model_id -> size of its logits file; other entries of logits/ are named in one warning line."""
        sizes, damaged = {}, ([] if _damaged is None else _damaged)
        for info in self.entries("logits"):
            name = info.base_name
            if info.type == pafs.FileType.File and name.endswith(".parquet") \
                    and is_model_id(name[: -len(".parquet")]):
                sizes[name[: -len(".parquet")]] = info.size
            else:
                damaged.append((f"logits/{name}", "is a folder" if info.type != pafs.FileType.File
                                else "is not named <model id>.parquet"))
        if _damaged is None:
            self._warn_damaged(damaged)
        return sizes

    def catalog(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """(every usable marker, the intact ones among them) from one listing of models/ and logits/, with
        damaged or foreign entries of both named in one warning line."""
        damaged: list = []
        found = self._scan(damaged)
        self._warn_damaged(damaged)
        return found

    def _scan(self, damaged: list) -> tuple[dict[str, dict], dict[str, dict]]:
        """catalog() without its warning: damaged entries are appended to `damaged`."""
        sizes = self.logits_sizes(damaged)
        markers = self.markers(damaged)
        return markers, {mid: m for mid, m in markers.items() if sizes.get(mid) == m.get("bytes")}

    def intact_models(self) -> dict[str, dict]:
        """Markers whose logits file exists with the recorded size: a cheap check (one listing) that
        catches deleted or truncated files; the contents are checked when a file is read. Damaged or
        foreign entries of models/ and logits/ are named in one warning line (catalog)."""
        return self.catalog()[1]

    def _verify_problem(self, model_id: str, marker: dict) -> tuple[str, str] | None:
        rel = f"logits/{model_id}.parquet"
        try:
            data = self.read_bytes(rel)
        except StoreError:
            return rel, "is missing"
        if hashlib.sha256(data).hexdigest() != marker["sha256"]:
            return rel, "fails its checksum"
        if marker.get("weights") is None:
            return None
        rel = f"weights/{model_id}.pt"
        if marker.get("weights_sha256") is None:  # a marker from before weights checksums: existence only
            return None if self.exists(rel) else (rel, "is missing")
        try:
            data = self.read_bytes(rel)
        except StoreError:
            return rel, "is missing"
        if len(data) != marker["weights_bytes"] or hashlib.sha256(data).hexdigest() != marker["weights_sha256"]:
            return rel, "fails its checksum"
        return None

    def verified_models(self) -> dict[str, dict]:
        """Markers whose logits file, and weights file where the marker records one, match the recorded
        sha256 (reads every file; `ufarm run --verify`). The others are named in one warning line."""
        damaged: list[tuple[str, str]] = []
        _, intact = self._scan(damaged)
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = list(pool.map(lambda item: self._verify_problem(*item), intact.items()))
        self._warn_damaged(damaged + [p for p in problems if p is not None])
        return {mid: m for (mid, m), p in zip(intact.items(), problems) if p is None}

    def write_model(self, model_id: str, table: pa.Table, marker: dict, weights: bytes | None = None) -> dict:
        """Weights, then the logits file, then the marker (the commit). Returns the marker written."""
        check_model_id(model_id)
        if weights is not None:
            self.write_bytes(f"weights/{model_id}.pt", weights)
        data = parquet_bytes(table)
        self.write_bytes(f"logits/{model_id}.parquet", data)
        marker = {**marker, "model_id": model_id, "logits": f"logits/{model_id}.parquet",
                  "sha256": hashlib.sha256(data).hexdigest(), "bytes": data.size, "rows": table.num_rows,
                  "page_checksums": True,
                  "weights": f"weights/{model_id}.pt" if weights is not None else None,
                  "weights_sha256": hashlib.sha256(weights).hexdigest() if weights is not None else None,
                  "weights_bytes": memoryview(weights).nbytes if weights is not None else None,
                  "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.write_json(f"models/{model_id}.json", marker)
        self.delete(f"failed/{model_id}.json")
        return marker

    def read_weights(self, model_id: str, marker: dict | None = None) -> bytes:
        """weights/<model_id>.pt; with the model's marker, checked against its weights_sha256 (a StoreError
        naming the model on a mismatch; markers from before weights checksums have none to check)."""
        rel = f"weights/{check_model_id(model_id)}.pt"
        if marker is not None:
            problem = marker_problem(model_id, marker)
            if problem:
                raise StoreError(f"model {model_id}: its marker {problem}")
            if marker.get("weights") is None:
                raise StoreError(f"model {model_id} has no stored weights (its marker records none)")
        data = self.read_bytes(rel)
        want = marker.get("weights_sha256") if marker is not None else None
        if want is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != want or len(data) != marker.get("weights_bytes"):
                raise StoreError(f"model {model_id}: weights file {rel} fails its checksum (marker {want[:12]}, "
                                 f"file {digest[:12]}); `ufarm run --verify` retrains it")
        return data

    def read_logits(self, model_id: str, marker: dict, columns: list[str] | None = None,
                    verify: bool = True, whole_file: bool = False, rows: tuple[int, int] | None = None,
                    footer: bytes | None = None) -> pa.Table:
        """logits/<model_id>.parquet (the key derived from the id, never a path from the marker), checked.

        Some columns of a file written with page checksums (marker `page_checksums`) are read alone: on S3
        ranged reads of the footer and those columns' pages, each page checked against its CRC-32, and the
        file's size against the marker. Otherwise (or with whole_file=True) the whole file is read and
        checked against the marker's sha256, as `ufarm run --verify` does. ``rows=(start, stop)`` returns
        only those file rows (example e, query q is row e * Q + q), decoding only the row groups that hold
        them (rows past the file's end are not returned); on the page-checksum path only those row groups'
        pages are fetched, each checked against its CRC-32.  ``footer``: the file's footer as read_footer
        returned it, so that a reader of many ranges of one file reads it once (else it is read here)."""
        return self._read_table(model_id, marker, columns, verify, whole_file, rows, footer)[0]

    def read_footer(self, model_id: str, marker: dict) -> bytes:
        """The end of the model's logits file that holds its Parquet footer (for read_logits and read_conf's
        ``footer``/``footers``): its last FOOTER_TAIL bytes, or the whole footer when it is longer."""
        return self._with_logits_file(model_id, self._logits_rel(model_id, marker), marker,
                                      lambda fh: _footer_bytes(fh, marker["bytes"]))

    def _read_table(self, model_id: str, marker: dict, columns: list[str] | None, verify: bool, whole_file: bool,
                    rows: tuple[int, int] | None, footer: bytes | None = None) -> tuple[pa.Table, int]:
        """read_logits -> (table, the file's row count)."""
        rel = self._logits_rel(model_id, marker)
        if verify and columns is not None and not whole_file and marker.get("page_checksums") is True:
            return self._read_columns(model_id, rel, marker, columns, rows, footer)
        data = self._checked_logits(model_id, rel, marker) if verify else self.read_bytes(rel)
        # one thread per file: callers read many files from a thread pool, which parallelises better
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
            return _row_range(pf, columns, rows, model_id, rel), pf.metadata.num_rows
        except pa.ArrowException as exc:
            raise StoreError(f"model {model_id}: logits file {rel} is not readable ({first_line(exc)})") from None

    def check_logits(self, model_id: str, marker: dict) -> None:
        """Read the model's whole logits file and check it against the marker's sha256 (a StoreError naming
        the model otherwise), as every whole-file read does; `ufarm evaluate --verify` runs it once per model."""
        self._checked_logits(model_id, self._logits_rel(model_id, marker), marker)

    @staticmethod
    def _logits_rel(model_id: str, marker: dict) -> str:
        """logits/<model_id>.parquet, derived from the checked id, once the marker is found usable."""
        rel = f"logits/{check_model_id(model_id)}.parquet"
        problem = marker_problem(model_id, marker)
        if problem:
            raise StoreError(f"model {model_id}: its marker {problem}")
        return rel

    def _checked_logits(self, model_id: str, rel: str, marker: dict) -> bytes:
        data = self.read_bytes(rel)
        digest = hashlib.sha256(data).hexdigest()
        if digest != marker["sha256"]:
            raise StoreError(f"model {model_id}: logits file {rel} fails its checksum "
                             f"(marker {marker['sha256'][:12]}, file {digest[:12]}); `ufarm run` retrains it")
        return data

    def _read_columns(self, model_id: str, rel: str, marker: dict, columns: list[str],
                      rows: tuple[int, int] | None, footer: bytes | None) -> tuple[pa.Table, int]:
        def read(fh):
            tail = footer if footer is not None else _footer_bytes(fh, marker["bytes"])
            pf = pq.ParquetFile(fh, metadata=_footer_metadata(tail), page_checksum_verification=True)
            return _row_range(pf, columns, rows, model_id, rel), pf.metadata.num_rows
        return self._with_logits_file(model_id, rel, marker, read)

    def _with_logits_file(self, model_id: str, rel: str, marker: dict, read):
        """read(fh) of the logits file opened for ranged reads, once its size is the marker's; S3's transient
        errors retried, and what fails (a page whose CRC-32 fails, a footer or file Parquet cannot read) one
        StoreError naming the model."""
        def attempt():
            with self.fs.open_input_file(self.path(rel)) as fh:
                if fh.size() != marker["bytes"]:
                    raise StoreError(f"model {model_id}: logits file {rel} has {fh.size()} bytes, its marker "
                                     f"{marker['bytes']}; `ufarm run` retrains it")
                return read(fh)
        try:
            return retry_transient(attempt, f"reading {self.uri}/{rel}") if self.is_s3 else attempt()
        except FileNotFoundError:
            raise StoreError(f"model {model_id}: logits file {rel} does not exist; `ufarm run` retrains it") from None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StoreError(f"model {model_id}: logits file {rel} fails its page checksums or is not readable "
                             f"({first_line(exc)}); `ufarm run --verify` retrains it") from None

    def read_conf(self, model_ids: list[str] | None = None, roles: tuple[str, ...] | None = None,
                  verify: bool = True, whole_file: bool = False, examples: tuple[int, int] | slice | None = None,
                  markers: dict[str, dict] | None = None,
                  flags: tuple[str, ...] = ("trained_on", "forgotten"),
                  footers: dict[str, bytes] | None = None) -> StoreConf:
        """conf[models, examples, queries] (float32) with roles and per-example membership, for the given
        models (default: every committed model, optionally only some roles), in model-id order.
        ``examples=(start, stop)`` (or a slice) reads only those examples' rows (only the row groups that
        hold them); ``markers`` (model id -> marker, as markers() returns them) saves reading the markers
        again, e.g. in a worker that the driver hands them to; ``flags``: the per-example columns read beside
        conf (one left out is not fetched, and is None in the result); ``footers`` (model id -> read_footer)
        saves reading the files' footers again, e.g. in each of many ranges."""
        markers = self.markers() if markers is None else markers
        if model_ids is None:
            model_ids = sorted(m for m, mk in markers.items() if roles is None or mk["role"] in roles)
        missing = [m for m in model_ids if m not in markers]
        if missing:
            raise StoreError(f"store {self.uri} has no model(s) {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
        manifest = self.read_manifest()
        if manifest is None:
            raise StoreError(f"store {self.uri} has no manifest.json: no run has been prepared there")
        n_q = len(manifest["spec"]["queries"])
        n_e = manifest["n_examples"]
        start, stop = _example_range(examples, n_e)
        n_rows = stop - start
        m = len(model_ids)
        # filled in place by the readers: no per-model copies to stack at the end
        unknown = set(flags) - {"trained_on", "forgotten"}
        if unknown:
            raise StoreError(f"flags must be among trained_on and forgotten, got {sorted(unknown)}")
        conf = np.empty((m, n_rows, n_q), np.float32)
        read = {f: np.empty((m, n_rows), bool) for f in ("trained_on", "forgotten") if f in flags}

        def load(i_mid):
            i, mid = i_mid
            t, file_rows = self._read_table(mid, markers[mid], ["conf", *read], verify, whole_file,
                                            None if examples is None else (start * n_q, stop * n_q),
                                            None if footers is None else footers.get(mid))
            if file_rows != n_e * n_q or t.num_rows != n_rows * n_q:
                raise StoreError(f"model {mid}: logits file has {file_rows} rows, the run has {n_e} x {n_q}")
            conf[i] = t.column("conf").to_numpy().reshape(n_rows, n_q)
            for name, out in read.items():
                out[i] = t.column(name).to_numpy()[::n_q]

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            list(pool.map(load, enumerate(model_ids)))
        return StoreConf(
            model_ids=list(model_ids),
            roles=np.array([markers[i]["role"] for i in model_ids], dtype=object),
            conf=conf, trained_on=read.get("trained_on"), forgotten=read.get("forgotten"),
            example_ids=np.arange(start, stop, dtype=np.int32),
            markers=[markers[i] for i in model_ids],
        )

    # ------------------------------------------------------------------------------- failures
    def write_failure(self, model_id: str, info: dict) -> None:
        self.write_json(f"failed/{model_id}.json", {**info, "model_id": model_id})

    def failures(self) -> dict[str, dict]:
        """model_id -> failure record; unusable entries of failed/ are named in one warning line and left out."""
        out, damaged = {}, []
        for info in self.entries("failed"):
            name = info.base_name
            mid = name[: -len(".json")] if name.endswith(".json") else None
            if info.type != pafs.FileType.File or not is_model_id(mid):
                damaged.append((f"failed/{name}", "is not named <model id>.json"))
                continue
            try:
                record = json.loads(self.read_bytes(f"failed/{name}"))
            except StoreError:
                continue  # removed since the listing (the model succeeded)
            except (ValueError, RecursionError) as exc:
                damaged.append((f"failed/{name}", f"is not valid JSON ({first_line(exc)})"))
                continue
            if not isinstance(record, dict):
                damaged.append((f"failed/{name}", "is not a JSON object"))
                continue
            error = record.get("error")
            out[mid] = {**record, "model_id": mid, "error": error if isinstance(error, str) else "unknown error"}
        self._warn_damaged(damaged)
        return out


def _footer_bytes(fh, size: int) -> bytes:
    """The end of the Parquet file open as ``fh`` (``size`` bytes) that holds its footer: the last FOOTER_TAIL
    bytes, and the rest of a longer footer in a second read.  A file ends with the footer, its length (4 bytes,
    little-endian) and b"PAR1"."""
    tail_size = min(size, FOOTER_TAIL)
    fh.seek(size - tail_size)
    tail = fh.read(tail_size)
    if len(tail) != tail_size or tail_size < 12 or tail[-4:] != b"PAR1":
        raise ValueError("no Parquet footer at the file's end")
    n = int.from_bytes(tail[-8:-4], "little")
    if n + 12 > size:
        raise ValueError(f"a footer of {n} bytes does not fit in the file's {size}")
    if n + 8 > tail_size:
        fh.seek(size - 8 - n)
        tail = fh.read(n + 8 - tail_size) + tail
    return tail


def _footer_metadata(tail: bytes) -> pq.FileMetaData:
    """The metadata of a Parquet file from the end of it that holds its footer (_footer_bytes): the footer, its
    length and b"PAR1", with a leading b"PAR1", parse as a file of their own (the column chunks' offsets in it
    are the real file's)."""
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ValueError("no Parquet footer at the end of the bytes given")
    n = int.from_bytes(tail[-8:-4], "little")
    if n + 8 > len(tail):
        raise ValueError(f"a footer of {n} bytes is longer than the {len(tail)} bytes given")
    return pq.ParquetFile(pa.BufferReader(b"PAR1" + tail[-(n + 8):])).metadata


def _example_range(examples: tuple[int, int] | slice | None, n_e: int) -> tuple[int, int]:
    """(start, stop) of the examples asked for, within [0, n_e]."""
    if examples is None:
        return 0, n_e
    if isinstance(examples, slice):
        if examples.step not in (None, 1):
            raise StoreError(f"examples must be a contiguous range, got a slice with step {examples.step}")
        start, stop, _ = examples.indices(n_e)
    else:
        start, stop = (int(v) for v in examples)
    if not 0 <= start <= stop <= n_e:
        raise StoreError(f"examples ({start}, {stop}) is not a range within the run's {n_e} examples")
    return start, stop


def _row_range(pf: pq.ParquetFile, columns: list[str] | None, rows: tuple[int, int] | None, model_id: str,
               rel: str) -> pa.Table:
    """Rows [start, stop) of a Parquet file, decoding only the row groups that hold them."""
    if rows is None:
        return pf.read(columns=columns, use_threads=False)
    md = pf.metadata
    start, stop = min(rows[0], md.num_rows), min(rows[1], md.num_rows)  # rows past the end: none (as a slice)
    if not 0 <= start <= stop:
        raise StoreError(f"model {model_id}: rows {rows[0]}:{rows[1]} of logits file {rel} is not a range")
    groups, first = row_groups_covering([md.row_group(i).num_rows for i in range(md.num_row_groups)], start, stop)
    if not groups:
        return pf.schema_arrow.empty_table().select(columns) if columns is not None else pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups, columns=columns, use_threads=False).slice(start - first, stop - start)
