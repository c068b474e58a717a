import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.scores import logit_scaled_confidence
from farm.store import RunStore, StoreError, check_compatible, examples_table, logits_table


def _model_table(seed=0, n_e=50, n_q=2, n_c=4, keep=True):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n_e, n_q, n_c)).astype(np.float32) * 3
    labels = rng.integers(0, n_c, n_e)
    trained = rng.random(n_e) < 0.5
    return labels, logits, trained, logits_table(labels, logits, trained, np.zeros(n_e, bool), keep)


def _init(store, n_e=50, n_q=2):
    manifest = {"format_version": 1, "spec": {"name": "t", "queries": ["plain"] * n_q}, "identity": "x",
                "identity_fields": {"seed": 0}, "dataset": {"name": "d", "fingerprint": "f" * 64},
                "n_examples": n_e, "n_classes": 4}
    split = np.array(["train"] * n_e)
    store.init_run(manifest, examples_table(split, np.zeros(n_e, int), None, np.zeros(n_e, bool)))
    return manifest


def test_logits_table_layout_and_conf():
    labels, logits, trained, table = _model_table()
    assert table.schema.field("example_id").type == pa.int32()
    assert table.schema.field("query").type == pa.int8()
    assert table.schema.field("conf").type == pa.float32()
    assert table.schema.field("pred").type == pa.int16()
    assert table.schema.field("logits").type == pa.list_(pa.float32(), 4)
    conf = table.column("conf").to_numpy().reshape(50, 2)
    expected = logit_scaled_confidence(logits, labels[:, None]).astype(np.float32)
    assert np.array_equal(conf, expected)
    # independent form of the definition: log p_y - log(1 - p_y), in float64
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    py = np.take_along_axis(p, np.broadcast_to(labels[:, None, None], (50, 2, 1)), -1)[..., 0]
    assert np.allclose(conf, np.log(py) - np.log1p(-py), atol=1e-4)
    assert np.array_equal(table.column("trained_on").to_numpy()[::2], trained)
    _, _, _, slim = _model_table(keep=False)
    assert "logits" not in slim.column_names


def test_write_read_roundtrip_and_checksum(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    _init(store)
    tables = {}
    for i, role in enumerate(["shadow", "shadow", "retrain"]):
        labels, logits, trained, table = _model_table(seed=i)
        tables[f"{role}-{i:05d}"] = (table, trained)
        store.write_model(f"{role}-{i:05d}", table, {"role": role})
    assert sorted(os.listdir(tmp_path / "run" / "logits")) == sorted(f"{m}.parquet" for m in tables)
    got = store.read_conf()
    assert got.model_ids == sorted(tables) and got.conf.shape == (3, 50, 2)
    for k, mid in enumerate(got.model_ids):
        assert np.array_equal(got.conf[k].reshape(-1), tables[mid][0].column("conf").to_numpy())
        assert np.array_equal(got.trained_on[k], tables[mid][1])
    shadows = store.read_conf(roles=("shadow",))
    assert list(shadows.roles) == ["shadow", "shadow"]
    # corrupt one file: the reader names the model; the cheap size check flags it for retraining
    path = tmp_path / "run" / "logits" / "shadow-00001.parquet"
    pristine = path.read_bytes()
    data = bytearray(pristine)
    data[100] ^= 0xFF  # in a column the evaluation does not read: only the whole-file check sees it
    path.write_bytes(bytes(data))
    assert np.array_equal(store.read_conf().conf, got.conf)
    with pytest.raises(StoreError, match="model shadow-00001: logits file .* fails its checksum"):
        store.read_conf(whole_file=True)
    md = pq.ParquetFile(path).metadata.row_group(0)
    conf = next(md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema == "conf")
    data = bytearray(pristine)
    data[conf.data_page_offset + conf.total_compressed_size - 8] ^= 0xFF  # inside conf's page: its CRC fails
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="model shadow-00001: logits file .* fails its page checksums"):
        store.read_conf()
    path.write_bytes(bytes(data[:-10]))
    assert "shadow-00001" not in store.intact_models()
    with pytest.raises(StoreError, match="has no model"):
        store.read_conf(["retrain-00009"])


def test_logits_file_schema_and_encodings(tmp_path):
    """The file on disk has the contract's types, every field non-nullable (no definition levels to encode),
    and the encodings that docs/store.md names; the bytes read back equal the table written."""
    store = RunStore(str(tmp_path))
    _init(store)
    _, _, _, table = _model_table()
    marker = store.write_model("shadow-00000", table, {"role": "shadow"})
    data = (tmp_path / marker["logits"]).read_bytes()
    assert marker["bytes"] == len(data)
    back = pq.read_table(tmp_path / marker["logits"])
    assert back.equals(table)
    assert all(not f.nullable for f in back.schema)
    meta = pq.ParquetFile(tmp_path / marker["logits"]).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert "DELTA_BINARY_PACKED" in columns["example_id"].encodings
    assert columns["query"].compression == "SNAPPY"
    for name in ("conf", "pred", "trained_on", "forgotten"):
        assert columns[name].compression == "UNCOMPRESSED"
        assert not any("DICTIONARY" in e for e in columns[name].encodings), name


def test_read_conf_names_a_file_with_the_wrong_row_count(tmp_path):
    store = RunStore(str(tmp_path))
    _init(store)
    store.write_model("shadow-00000", _model_table(n_e=40)[3], {"role": "shadow"})
    with pytest.raises(StoreError, match="model shadow-00000: logits file has 80 rows, the run has 50 x 2"):
        store.read_conf()


def test_temporaries_are_invisible_and_cleaned(tmp_path):
    """Temporaries carry their writer's token; cleanup removes only its own (another run's stay)."""
    store = RunStore(str(tmp_path))
    _init(store)
    (tmp_path / "logits").mkdir(exist_ok=True)
    (tmp_path / "logits" / f".tmp-{store.token}-abc-shadow-00000.parquet").write_bytes(b"partial")
    (tmp_path / "logits" / ".tmp-0123456789abcdef-abc-shadow-00001.parquet").write_bytes(b"another run's")
    assert store.list_dir("logits") == []
    assert store.remove_temporaries() == 1
    assert os.listdir(tmp_path / "logits") == [".tmp-0123456789abcdef-abc-shadow-00001.parquet"]


def test_manifest_refuses_other_runs(tmp_path):
    store = RunStore(str(tmp_path))
    old = _init(store)
    other_data = {**old, "dataset": {"name": "e", "fingerprint": "0" * 64}}
    with pytest.raises(StoreError, match="holds a run on other data"):
        check_compatible(old, other_data, "x")
    other_spec = {**old, "identity": "y", "identity_fields": {"seed": 1}}
    with pytest.raises(StoreError, match="holds another spec .* fields that differ: seed"):
        store.init_run(other_spec, pa.table({"a": [1]}))


def test_bad_uris(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is not a folder"):
        RunStore(str(f)).check_reachable()
    with pytest.raises(StoreError, match="scheme 'gs'"):
        RunStore("gs://bucket/run")
    with pytest.raises(StoreError, match="names no bucket"):
        RunStore("s3:///run")


def test_s3_roundtrip(bucket):
    store = RunStore(f"s3://{bucket}/runs/a")
    store.check_reachable()
    _init(store)
    _, _, _, table = _model_table()
    store.write_model("retrain-00000", table, {"role": "retrain"})
    got = store.read_conf()
    assert np.array_equal(got.conf[0].reshape(-1), table.column("conf").to_numpy())
    assert store.read_manifest()["n_examples"] == 50


def test_s3_missing_bucket_and_unreachable_endpoint(s3_server, monkeypatch):
    with pytest.raises(StoreError, match="S3 bucket 'no-such-bucket' does not exist"):
        RunStore("s3://no-such-bucket/run").check_reachable()
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("UFARM_S3_ATTEMPTS", "1")
    with pytest.raises(StoreError, match="cannot reach the S3 store"):
        RunStore("s3://any/run").check_reachable()


def test_retry_back_off_is_jittered_and_capped():
    """Full jitter: actors throttled together must not retry together; never more than 8 s."""
    from farm.store.filesystem import backoff_seconds

    for attempt in range(12):
        cap = min(8.0, 0.25 * 2 ** attempt)
        delays = [backoff_seconds(attempt) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert len(set(delays)) > 150 and max(delays) > 0.8 * cap and min(delays) < 0.2 * cap
