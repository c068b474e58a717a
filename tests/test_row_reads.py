"""Row-projected reads: logits files are written in row groups of ROW_GROUP_EXAMPLES examples, a reader of a
range of examples decodes (and on the page-checksum path fetches) only the row groups that hold it, every
page it reads checked against its CRC-32; files of one row group (written before) read the same."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.store import RunStore, StoreError, examples_table, logits_table, parquet_bytes, run_store
from farm.store.layout import ROW_GROUP_EXAMPLES, row_groups_covering
from tests.conftest import CountingFS

N_Q = 2
COLS = ["conf", "trained_on", "forgotten"]


def _store(root, n_e: int, n_models: int = 2):
    store = RunStore(str(root))
    manifest = {"format_version": 1, "spec": {"name": "t", "queries": ["plain", "hflip"]}, "identity": "x",
                "identity_fields": {"seed": 0}, "dataset": {"name": "d", "fingerprint": "f" * 64},
                "n_examples": n_e, "n_classes": 3}
    store.init_run(manifest, examples_table(np.array(["train"] * n_e), np.zeros(n_e, int), None, np.zeros(n_e, bool)))
    markers = {}
    for k in range(n_models):
        rng = np.random.default_rng(k)
        logits = rng.normal(size=(n_e, N_Q, 3)).astype(np.float32)
        table = logits_table(rng.integers(0, 3, n_e), logits, rng.random(n_e) < 0.5, rng.random(n_e) < 0.1, False)
        markers[f"shadow-{k:05d}"] = store.write_model(f"shadow-{k:05d}", table, {"role": "shadow"})
    return store, markers


def test_row_groups_of_fixed_examples_change_no_value():
    rng = np.random.default_rng(0)
    n_e = 2 * ROW_GROUP_EXAMPLES + 100
    table = logits_table(rng.integers(0, 3, n_e), rng.normal(size=(n_e, N_Q, 3)).astype(np.float32),
                         rng.random(n_e) < 0.5, np.zeros(n_e, bool), True)
    pf = pq.ParquetFile(pa.BufferReader(parquet_bytes(table)))
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)] == \
        [ROW_GROUP_EXAMPLES * N_Q, ROW_GROUP_EXAMPLES * N_Q, 100 * N_Q]
    assert pf.read().equals(table)
    one = pq.ParquetFile(pa.BufferReader(parquet_bytes(table, row_group_examples=10 ** 9)))
    assert one.metadata.num_row_groups == 1 and one.read().equals(table)
    assert parquet_bytes(table) == parquet_bytes(table)  # deterministic: a grown store still equals a planned one


def test_row_groups_covering():
    assert row_groups_covering([10, 10, 5], 0, 25) == ([0, 1, 2], 0)
    assert row_groups_covering([10, 10, 5], 12, 13) == ([1], 10)
    assert row_groups_covering([10, 10, 5], 9, 11) == ([0, 1], 0)
    assert row_groups_covering([10, 10, 5], 20, 25) == ([2], 20)
    assert row_groups_covering([10, 10, 5], 7, 7) == ([], 7)


@pytest.mark.parametrize("whole_file", [False, True])
def test_read_conf_of_a_range_equals_the_slice_of_the_whole(tmp_path, whole_file):
    n_e = ROW_GROUP_EXAMPLES + 1000
    store, markers = _store(tmp_path / "run", n_e)
    full = store.read_conf(whole_file=whole_file)
    for start, stop in ((0, 10), (ROW_GROUP_EXAMPLES - 5, ROW_GROUP_EXAMPLES + 5), (300, n_e), (0, n_e), (7, 7)):
        part = RunStore(str(tmp_path / "run")).read_conf(examples=(start, stop), whole_file=whole_file,
                                                         markers=markers)
        assert part.model_ids == full.model_ids
        np.testing.assert_array_equal(part.conf, full.conf[:, start:stop])
        np.testing.assert_array_equal(part.trained_on, full.trained_on[:, start:stop])
        np.testing.assert_array_equal(part.forgotten, full.forgotten[:, start:stop])
        np.testing.assert_array_equal(part.example_ids, np.arange(start, stop))
    np.testing.assert_array_equal(store.read_conf(examples=slice(5, 50)).conf, full.conf[:, 5:50])
    conf_only = store.read_conf(examples=(5, 50), flags=())
    assert conf_only.trained_on is None and conf_only.forgotten is None
    np.testing.assert_array_equal(conf_only.conf, full.conf[:, 5:50])
    for bad in ((-1, 3), (5, 2), (0, n_e + 1)):
        with pytest.raises(StoreError, match="not a range within the run's"):
            store.read_conf(examples=bad)


def test_files_of_one_row_group_read_the_same(tmp_path):
    """A file written before row groups (one row group) and its marker: row reads give the same values."""
    n_e = ROW_GROUP_EXAMPLES + 500
    store, markers = _store(tmp_path / "run", n_e, n_models=1)
    before = store.read_conf(examples=(ROW_GROUP_EXAMPLES - 3, n_e))
    path = tmp_path / "run" / "logits" / "shadow-00000.parquet"
    table = pq.read_table(str(path))
    data = parquet_bytes(table, row_group_examples=10 ** 9)
    path.write_bytes(data.to_pybytes())
    marker = {**markers["shadow-00000"], "sha256": hashlib.sha256(data).hexdigest(), "bytes": data.size}
    (tmp_path / "run" / "models" / "shadow-00000.json").write_text(json.dumps(marker))
    assert pq.ParquetFile(str(path)).metadata.num_row_groups == 1
    for whole_file in (False, True):
        after = RunStore(str(tmp_path / "run")).read_conf(examples=(ROW_GROUP_EXAMPLES - 3, n_e),
                                                          whole_file=whole_file)
        np.testing.assert_array_equal(after.conf, before.conf)
        np.testing.assert_array_equal(after.trained_on, before.trained_on)


def test_bytes_read_follow_the_range_not_the_file(tmp_path):
    n_e = 5 * ROW_GROUP_EXAMPLES
    _, markers = _store(tmp_path / "run", n_e, n_models=1)
    marker = markers["shadow-00000"]
    md = pq.ParquetFile(str(tmp_path / "run" / "logits" / "shadow-00000.parquet")).metadata
    used = [sum(md.row_group(g).column(i).total_compressed_size for i in range(md.num_columns)
                if md.row_group(g).column(i).path_in_schema in COLS) for g in range(md.num_row_groups)]

    def bytes_for(start, stop):
        reader = RunStore(str(tmp_path / "run"))
        reader.fs = counter = CountingFS()
        t = reader.read_logits("shadow-00000", marker, columns=COLS, rows=(start * N_Q, stop * N_Q))
        assert t.num_rows == (stop - start) * N_Q
        return counter.read

    one, two = bytes_for(0, ROW_GROUP_EXAMPLES), bytes_for(ROW_GROUP_EXAMPLES, 3 * ROW_GROUP_EXAMPLES)
    # the columns' pages of the row groups read, the file's tail (its footer), and between two row groups a
    # gap under 8 KiB that Arrow's coalescing of ranged reads fills rather than making another request
    assert used[0] < one <= used[0] + run_store.FOOTER_TAIL
    assert used[1] + used[2] < two <= used[1] + used[2] + run_store.FOOTER_TAIL + 8192
    assert one < marker["bytes"] / 4
    # a range inside one row group reads that group only
    assert abs(bytes_for(ROW_GROUP_EXAMPLES + 10, ROW_GROUP_EXAMPLES + 20) - one) < 1024


def test_a_footer_longer_than_the_tail_takes_a_second_read(tmp_path, monkeypatch):
    n_e = 3 * ROW_GROUP_EXAMPLES
    _, markers = _store(tmp_path / "run", n_e, n_models=1)
    want = RunStore(str(tmp_path / "run")).read_conf(examples=(ROW_GROUP_EXAMPLES, n_e))
    monkeypatch.setattr(run_store, "FOOTER_TAIL", 64)  # far shorter than the footer
    got = RunStore(str(tmp_path / "run")).read_conf(examples=(ROW_GROUP_EXAMPLES, n_e))
    np.testing.assert_array_equal(got.conf, want.conf)
    np.testing.assert_array_equal(got.trained_on, want.trained_on)


def test_a_footer_read_once_serves_every_range(tmp_path):
    n_e = 3 * ROW_GROUP_EXAMPLES
    _, markers = _store(tmp_path / "run", n_e, n_models=2)
    store = RunStore(str(tmp_path / "run"))
    footers = {mid: store.read_footer(mid, mk) for mid, mk in markers.items()}
    for start, stop in [(0, 10), (ROW_GROUP_EXAMPLES - 5, 2 * ROW_GROUP_EXAMPLES + 5), (0, n_e)]:
        want = RunStore(str(tmp_path / "run")).read_conf(examples=(start, stop))
        reader = RunStore(str(tmp_path / "run"))
        reader.fs = counter = CountingFS()
        got = reader.read_conf(examples=(start, stop), footers=footers, markers=markers)
        np.testing.assert_array_equal(got.conf, want.conf)
        np.testing.assert_array_equal(got.trained_on, want.trained_on)
        # no footer read: only the pages of the row groups that hold the range (and the manifest)
        md = pq.ParquetFile(str(tmp_path / "run" / "logits" / "shadow-00000.parquet")).metadata
        groups, _ = row_groups_covering([md.row_group(i).num_rows for i in range(md.num_row_groups)],
                                        start * N_Q, stop * N_Q)
        pages = 2 * sum(md.row_group(g).column(i).total_compressed_size for g in groups
                        for i in range(md.num_columns) if md.row_group(g).column(i).path_in_schema in COLS)
        manifest = (tmp_path / "run" / "manifest.json").stat().st_size
        assert pages <= counter.read <= pages + manifest + 2 * 8192 * (len(groups) - 1)
    marker = markers["shadow-00000"]
    with pytest.raises(StoreError, match="shadow-00000: logits file .* has .* bytes, its marker"):
        store.read_footer("shadow-00000", {**marker, "bytes": marker["bytes"] + 1})


@pytest.mark.parametrize("damage", ["magic", "length"])
def test_a_damaged_footer_end_is_one_line_naming_the_model(tmp_path, damage):
    _store(tmp_path / "run", ROW_GROUP_EXAMPLES, n_models=1)
    path = tmp_path / "run" / "logits" / "shadow-00000.parquet"
    data = bytearray(path.read_bytes())
    if damage == "magic":
        data[-1] ^= 0xFF
    else:  # a footer length past the file's start
        data[-8:-4] = (len(data) * 2).to_bytes(4, "little")
    path.write_bytes(bytes(data))  # same size: only the read finds it
    with pytest.raises(StoreError, match="shadow-00000.*fails its page checksums or is not readable"):
        RunStore(str(tmp_path / "run")).read_conf(examples=(0, 10))


def test_row_reads_check_the_pages_they_read(tmp_path):
    n_e = 3 * ROW_GROUP_EXAMPLES
    _, markers = _store(tmp_path / "run", n_e, n_models=1)
    path = tmp_path / "run" / "logits" / "shadow-00000.parquet"
    md = pq.ParquetFile(str(path)).metadata
    conf = next(md.row_group(2).column(i) for i in range(md.num_columns)
                if md.row_group(2).column(i).path_in_schema == "conf")
    data = bytearray(path.read_bytes())
    data[conf.data_page_offset + 1000] ^= 0xFF  # inside the third row group's conf page
    path.write_bytes(bytes(data))
    reader = RunStore(str(tmp_path / "run"))
    reader.read_conf(examples=(0, ROW_GROUP_EXAMPLES))  # the damaged group is not read
    with pytest.raises(StoreError, match="shadow-00000.*fails its page checksums"):
        reader.read_conf(examples=(2 * ROW_GROUP_EXAMPLES, 2 * ROW_GROUP_EXAMPLES + 1))
    with pytest.raises(StoreError, match="shadow-00000.*fails its checksum"):
        reader.read_conf(examples=(0, 1), whole_file=True)  # the sha256 covers the whole file


def test_row_reads_on_s3_equal_local(tmp_path, bucket):
    n_e = ROW_GROUP_EXAMPLES + 300
    local, markers = _store(tmp_path / "run", n_e)
    s3, _ = _store(f"s3://{bucket}/run", n_e)
    for start, stop in ((0, 5), (ROW_GROUP_EXAMPLES - 2, n_e)):
        a, b = local.read_conf(examples=(start, stop)), s3.read_conf(examples=(start, stop), markers=markers)
        np.testing.assert_array_equal(a.conf, b.conf)
        np.testing.assert_array_equal(a.trained_on, b.trained_on)
