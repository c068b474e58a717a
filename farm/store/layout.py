"""The run store's layout (docs/store.md, format_version 1): the model id pattern every key is derived
from, what a usable marker holds, and the Parquet tables a store keeps. Pure functions, no I/O."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from evaluation.scores import logit_scaled_confidence

FORMAT_VERSION = 1
TMP_TAG = ".tmp-"
LEASE = ".lease"
ROLES = ("original", "retrain", "shadow", "unlearned")
# The one model id pattern (farm.plan makes these ids; the method label is farm.spec.method_label's output,
# which has no '-' and starts with a letter, a digit or '_'; the hash is spec.UnlearnSpec.hparams_hash).
MODEL_ID = re.compile(r"(?:original|retrain|shadow)-[0-9]{5,9}"
                      r"|unlearned-[A-Za-z0-9_][A-Za-z0-9_.]{0,127}-[0-9a-f]{8}-[0-9]{5,9}", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
TOKEN = re.compile(r"[0-9a-f]{16}", re.ASCII)  # a writer's token: in its lease and its temporaries' names
# Logits files are written in row groups of this many examples (x Q queries rows), so a reader of a range of
# examples (a chunk of `ufarm evaluate`) fetches and decodes only the row groups that overlap it.
ROW_GROUP_EXAMPLES = 8192


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message is one line and names the store or model."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def short(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a value from an untrusted file inside a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable_name(name: str) -> str:
    """A listed file name as it can be printed on one line."""
    return name if name.isprintable() else ascii(name)


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_sha256(value) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


@dataclass
class StoreConf:
    """What the reader returns for a set of models: conf[models, examples, queries] and its metadata."""
    model_ids: list[str]
    roles: np.ndarray  # str [M]
    conf: np.ndarray  # float32 [M, E, Q]
    trained_on: np.ndarray | None  # bool [M, E] (None when not read: RunStore.read_conf's flags)
    forgotten: np.ndarray | None  # bool [M, E] (likewise)
    example_ids: np.ndarray  # int32 [E]
    markers: list[dict] = field(repr=False)


def is_model_id(value) -> bool:
    """True for a string that matches the one model id pattern (MODEL_ID)."""
    return isinstance(value, str) and MODEL_ID.fullmatch(value) is not None


def check_model_id(model_id) -> str:
    if not is_model_id(model_id):
        raise StoreError(f"{short(model_id)} is not a model id (original-00000, retrain-00017, shadow-00123 or "
                         "unlearned-<method>-<8 hex>-00005)")
    return model_id



def marker_problem(model_id: str, marker) -> str | None:
    """What is wrong with a marker read from models/<model_id>.json, or None when it is usable. The paths
    it records must be the derived ones (they are never followed); role, sha256 and bytes are required."""
    if not isinstance(marker, dict):
        return f"is not a JSON object but {type(marker).__name__}"
    if marker.get("model_id") != model_id:
        return f"has model_id {short(marker.get('model_id'))}, which disagrees with its file name"
    if marker.get("role") != model_id.split("-", 1)[0]:
        return f"has role {short(marker.get('role'))}, which disagrees with its model id"
    if not is_sha256(marker.get("sha256")):
        return "has no valid sha256"
    for key in ("bytes", "rows"):
        if (key == "bytes" or key in marker) and not is_count(marker.get(key)):
            return f"has no valid {key}"
    logits = f"logits/{model_id}.parquet"
    if marker.get("logits", logits) != logits:
        return f"records logits path {short(marker.get('logits'))}, not {logits}"
    weights = marker.get("weights")
    if weights is not None:
        if weights != f"weights/{model_id}.pt":
            return f"records weights path {short(weights)}, not weights/{model_id}.pt"
        if marker.get("weights_sha256") is not None and not (
                is_sha256(marker["weights_sha256"]) and is_count(marker.get("weights_bytes"))):
            return "has no valid weights_sha256 and weights_bytes"
    return None



def check_compatible(old: dict, new: dict, uri: str) -> None:
    version = old.get("format_version", FORMAT_VERSION)  # absent: the first stores, format 1
    if version != FORMAT_VERSION:
        raise StoreError(f"store {uri}: manifest.json has format_version {short(version)}; this ufarm reads "
                         f"format_version {FORMAT_VERSION}")
    dataset = old.get("dataset")
    if not isinstance(old.get("identity"), str) or not isinstance(old.get("identity_fields"), dict) \
            or not isinstance(dataset, dict) or not isinstance(dataset.get("fingerprint"), str):
        raise StoreError(f"store {uri}: manifest.json lacks a valid identity, identity_fields or dataset "
                         "fingerprint; it was not made by ufarm, use another store")
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


def queries_of(table: pa.Table) -> int:
    """Q of a logits table (rows are example-major, query 0..Q-1 for every example)."""
    return int(pc.max(table.column("query")).as_py()) + 1 if table.num_rows else 1


def parquet_bytes(table: pa.Table, row_group_examples: int = ROW_GROUP_EXAMPLES) -> pa.Buffer:
    """A logits table as Parquet bytes, with encodings chosen by measurement (docs/store.md): example ids,
    sorted, delta-packed; the alternating query column Snappy-compressed; everything else plain, with no
    dictionaries and no compression (random floats do not compress; a dictionary for pred saves 0.5 MB a
    file at 70,000 x 2 rows but costs more time in encoding than it saves in hashing and writing). Every
    page carries a CRC-32, so a reader that fetches only some columns still checks what it read. Row groups
    hold ``row_group_examples`` examples (x Q rows) each, so a range of examples is read without the rest."""
    if row_group_examples < 1:
        raise ValueError(f"row_group_examples must be >= 1, got {row_group_examples}")
    present = set(table.column_names)
    encoding = {c: "PLAIN" for c in ("query", "conf", "pred", "trained_on", "forgotten") if c in present}
    encoding["example_id"] = "DELTA_BINARY_PACKED"
    compression = {c: "none" for c in present}
    compression["query"] = "snappy"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, use_dictionary=False, column_encoding=encoding,
                   write_statistics=False, write_page_checksum=True,
                   row_group_size=row_group_examples * queries_of(table))
    return sink.getvalue()


def row_groups_covering(group_rows: list[int], start: int, stop: int) -> tuple[list[int], int]:
    """The row groups (given their row counts, in file order) that hold any row of [start, stop), and the
    file row the first of them starts at."""
    groups, first, offset = [], start, 0
    for i, n in enumerate(group_rows):
        if start < stop and offset < stop and offset + n > start:
            if not groups:
                first = offset
            groups.append(i)
        offset += n
    return groups, first


def examples_table(split: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, forget: np.ndarray) -> pa.Table:
    n = len(labels)
    return pa.table({
        "example_id": pa.array(np.arange(n, dtype=np.int32)),
        "split": pa.array(split.astype(str)),
        "label": pa.array(labels.astype(np.int16)),
        "group": pa.array(groups.astype(np.int32) if groups is not None else [None] * n, type=pa.int32()),
        "forget": pa.array(forget.astype(bool)),
    })


def json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

