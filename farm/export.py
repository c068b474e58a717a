"""`ufarm export`: a run store's per-example outputs in two layouts other tools read (docs/export.md).

- `lira`: the folders of tensorflow/privacy's research/mi_lira_2021, one per shadow model, so its plot.py
  runs unchanged on our shadows. Per model `experiment-<i>_<n>/keep.npy` (bool [N], the membership mask its
  train.py saves) and `experiment-<i>_<n>/scores/<epoch, 10 digits>.npy` ([N, queries], what its score.py
  saves: log p_y - log sum_{k!=y} p_k per augmentation, which is our stored `conf`, query by query).
  N is the run's train split: the examples a shadow can be trained on. Val and test examples are left out
  because they are OUT for every model, and plot.py's online attack takes the median and spread of the IN
  scores of every example: one with no IN score makes all its predictions NaN.
- `wide`: one Parquet table with a row per (model, example, query): the logits files' columns with the
  model's id and role, and the example's split, label and forget flag joined in. Written model by model
  (memory bounded by one model's rows).

Both read the store as every reader does (committed models whose logits file has its recorded size, each
checked against its sha256 as it is read); a model that fails its check is named in one warning line and
left out. Both write to a temporary name beside the destination and rename at the end: a failure or
Ctrl-C leaves nothing behind. numpy and pyarrow only: no Ray, no torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from farm.store import ROLES, RunStore, StoreError

log = logging.getLogger("ufarm")
FORMATS = ("lira", "wide")
TMP_PREFIX = ".tmp-export-"
LIRA_HEADER = "LiRA shadow-model scores written by `ufarm export --to lira`."
LIRA_MIN_SHADOWS = 4  # plot.py holds one model out; the rest must hold every example IN and OUT: 2 pairs
WIDE_SCHEMA = pa.schema([pa.field(name, typ, nullable=False) for name, typ in [
    ("model_id", pa.string()), ("role", pa.string()), ("example_id", pa.int32()), ("query", pa.int8()),
    ("conf", pa.float32()), ("pred", pa.int16()), ("trained_on", pa.bool_()), ("forgotten", pa.bool_()),
    ("split", pa.string()), ("label", pa.int16()), ("forget", pa.bool_())]])
_LOGITS_COLUMNS = ["example_id", "query", "conf", "pred", "trained_on", "forgotten"]
EPILOG = """examples:
  ufarm export runs/digits-demo --to lira exp/digits
      one folder per shadow model in the layout of tensorflow/privacy's research/mi_lira_2021
      (keep.npy, scores/); exp/digits/README.txt says how to point its plot.py at it
  ufarm export runs/digits-demo --to wide all.parquet
      one Parquet table, a row per (model, example, query), for pandas, DuckDB or pyarrow.dataset
  ufarm export runs/digits-demo --to wide retrain.parquet --roles retrain,unlearned
"""


# ------------------------------------------------------------------------------------- inputs
def _open_store(store_uri: str) -> tuple[RunStore, dict]:
    """The store and its manifest; a one-line StoreError when it is missing or not a run store."""
    store = RunStore(store_uri)
    store.check_reachable()
    if not store.is_s3 and not os.path.isdir(store.root):
        raise StoreError(f"store {store_uri} does not exist")
    manifest = store.read_manifest()
    if manifest is None:
        raise StoreError(f"store {store_uri} has no manifest.json; it is not a run store (`ufarm run` makes one)")
    queries = manifest["spec"].get("queries")
    if not isinstance(queries, list) or not queries:
        raise StoreError(f"store {store_uri}: manifest.json's spec has no list of queries")
    return store, manifest


def _examples(store: RunStore, manifest: dict) -> pa.Table:
    """examples.parquet, checked to hold example ids 0..n_examples-1 in order (the logits files' rows)."""
    table = store.read_examples(manifest)
    n_e = manifest["n_examples"]
    missing = {"example_id", "split", "label", "forget"} - set(table.column_names)
    if missing:
        raise StoreError(f"store {store.uri}: examples.parquet lacks the column(s) {', '.join(sorted(missing))}")
    ids = table.column("example_id").to_numpy()
    if len(ids) != n_e or not np.array_equal(ids, np.arange(n_e)):
        raise StoreError(f"store {store.uri}: examples.parquet does not hold example ids 0..{n_e - 1} in order "
                         f"({len(ids)} rows); `ufarm run` rewrites it")
    return table


def _check_roles(roles) -> tuple[str, ...] | None:
    if roles is None:
        return None
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise StoreError(f"roles {', '.join(map(repr, bad)) or '(none)'}: each must be one of {', '.join(ROLES)}")
    return roles


def _models(store: RunStore, roles: tuple[str, ...] | None) -> list[tuple[str, dict]]:
    """(model_id, marker) of the committed, intact models of these roles, in model-id order."""
    intact = store.intact_models()
    return sorted(((mid, m) for mid, m in intact.items() if roles is None or m["role"] in roles),
                  key=lambda item: item[0])


def _read(store: RunStore, mid: str, marker: dict, columns: list[str], expected: tuple[np.ndarray, np.ndarray],
          skipped: list[tuple[str, str]]) -> pa.Table | None:
    """One model's logits columns, checked against its sha256 and the run's row layout (row = e * Q + q); a
    model that fails is named in one warning line, added to `skipped` and left out (None)."""
    try:
        table = store.read_logits(mid, marker, columns=columns)
        example_id, query = expected
        if table.num_rows != len(example_id):
            raise StoreError(f"model {mid}: logits file has {table.num_rows} rows, the run has {len(example_id)}")
        if not (np.array_equal(table.column("example_id").to_numpy(), example_id)
                and np.array_equal(table.column("query").to_numpy(), query)):
            raise StoreError(f"model {mid}: logits file's rows are not example-major (row = example * queries "
                             "+ query)")
    except StoreError as exc:
        log.warning("%s; left out of the export", exc)
        skipped.append((mid, str(exc)))
        return None
    return table


# ------------------------------------------------------------------------------- destinations
def _local_dest(dest: str) -> str:
    if "://" in dest:
        raise StoreError(f"export destination {dest!r} is a URI; exports are written to a local path")
    return os.path.abspath(os.path.expanduser(dest))


def _is_lira_export(path: str) -> bool:
    try:
        with open(os.path.join(path, "README.txt"), encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == LIRA_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def _check_lira_dest(dest: str, force: bool) -> None:
    """A LiRA folder goes where nothing is, or an empty folder, or (with force) an earlier LiRA export. A
    folder of anything else is never replaced, --force or not: replacing deletes it."""
    if not os.path.lexists(dest):
        return
    if not os.path.isdir(dest) or os.path.islink(dest):
        raise StoreError(f"export destination {dest} exists and is not a folder; choose a new folder")
    if not os.listdir(dest):
        return
    if not force:
        raise StoreError(f"export destination {dest} is a non-empty folder; choose a new folder, or pass --force "
                         "to replace an earlier lira export")
    if not _is_lira_export(dest):
        raise StoreError(f"export destination {dest} is a non-empty folder that is not an earlier lira export "
                         "(no README.txt written by ufarm export); --force replaces only those, choose a new folder")


def _check_wide_dest(dest: str, force: bool) -> None:
    if os.path.isdir(dest):
        raise StoreError(f"export destination {dest} is a folder; give a file name such as all.parquet")
    if os.path.lexists(dest) and not force:
        raise StoreError(f"export destination {dest} already exists; choose a new file name, or pass --force "
                         "to replace it")


class _Staging:
    """A temporary name beside the destination (same folder: the final rename is atomic), removed with any
    parent folders this export created when the body fails or is interrupted. An OSError (disk full, no
    permission) becomes a one-line StoreError naming the destination."""

    def __init__(self, dest: str):
        self.dest = dest
        self.created: list[str] = []  # deepest first
        probe = os.path.dirname(dest)
        while not os.path.lexists(probe):
            self.created.append(probe)
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise StoreError(f"export destination {dest}: {probe} is not a folder")
        self.tmp = os.path.join(os.path.dirname(dest), f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{os.path.basename(dest)}")

    def __enter__(self):
        try:
            os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        except OSError as exc:
            self._cleanup()
            raise StoreError(f"export destination {self.dest}: cannot create its folder ({exc.strerror or exc})") \
                from None
        return self

    def _cleanup(self) -> None:
        if os.path.isdir(self.tmp) and not os.path.islink(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif os.path.lexists(self.tmp):
            os.remove(self.tmp)
        for folder in self.created:
            try:
                os.rmdir(folder)
            except OSError:
                break

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        self._cleanup()
        if issubclass(exc_type, OSError):
            raise StoreError(f"export to {self.dest} failed, nothing written: {exc.strerror or exc}") from None
        return False

    def install(self) -> None:
        """Rename the finished temporary to the destination; an existing destination (an empty folder, an
        earlier export, a file with --force) is moved aside first and removed only once the new one is in."""
        if not os.path.lexists(self.dest):
            os.rename(self.tmp, self.dest)
            return
        if not os.path.isdir(self.dest):
            os.replace(self.tmp, self.dest)  # a file: replaced atomically
            return
        old = os.path.join(os.path.dirname(self.dest), f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-old-"
                                                       f"{os.path.basename(self.dest)}")
        os.rename(self.dest, old)
        try:
            os.rename(self.tmp, self.dest)
        except BaseException:
            os.rename(old, self.dest)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _layout(n_e: int, n_q: int) -> tuple[np.ndarray, np.ndarray]:
    """example_id and query of a logits file's rows: example-major, row = e * Q + q."""
    return np.repeat(np.arange(n_e, dtype=np.int32), n_q), np.tile(np.arange(n_q, dtype=np.int8), n_e)


# ------------------------------------------------------------------------------------- LiRA
def _score_name(manifest: dict) -> str:
    """inference.py and score.py name a file by the checkpoint's epoch, 10 digits; plot.py loads the last in
    sorted order. Ours: the run's training epochs (0 when the spec does not say)."""
    training = manifest["spec"].get("training")
    epochs = training.get("epochs") if isinstance(training, dict) else None
    ok = isinstance(epochs, int) and not isinstance(epochs, bool) and 0 <= epochs < 10**10
    return f"{epochs if ok else 0:010d}.npy"


def _columns(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(a) for a, _ in rows) + 2
    return [f"  {a:<{width}}{b}" for a, b in rows]


def _lira_readme(store_uri: str, manifest: dict, dest: str, ids: list[str], n_train: int, n_q: int,
                 score_name: str) -> str:
    n = len(ids)
    queries = ", ".join(map(str, manifest["spec"]["queries"]))
    lines = [
        LIRA_HEADER,
        "",
        f"Source: the run store {store_uri} (run {manifest['spec'].get('name')!r}, {n} committed shadow models).",
        "Layout: that of tensorflow/privacy's research/mi_lira_2021 (train.py writes keep.npy, score.py writes",
        "scores/), so its plot.py runs on these folders unchanged.",
        "",
    ] + _columns([
        (f"experiment-<i>_{n}/keep.npy", f"bool [{n_train}]: the shadow model was trained on the example"),
        (f"experiment-<i>_{n}/scores/{score_name}", f"float32 [{n_train}, {n_q}]: log p_y - log sum_(k!=y) p_k "
                                                    "of the true label,"),
        ("", "one column per query (the augmentation axis)"),
        (f"experiment-<i>_{n}/hparams.json", "the store's model id, role and seed of the shadow model"),
        ("example_ids.npy", f"int32 [{n_train}]: row j is the store's example_id example_ids[j]"),
        ("y_train.npy", f"int16 [{n_train}]: the examples' labels"),
    ]) + [
        "",
        f"Examples: the run's train split ({n_train} of {manifest['n_examples']}); val and test examples are never",
        "trained on, so they are left out (plot.py's online attack needs IN scores for every example).",
        f"Queries: {queries}.",
        "",
        "Running plot.py: it loads exp/cifar10/ relative to the folder it runs in, so either",
        f"  mkdir -p exp && ln -s {dest} exp/cifar10 && python3 plot.py",
        f"or change its call load_data(\"exp/cifar10/\") to load_data(\"{dest}/\").",
        "plot.py holds out the last model it finds as the target and fits on the others: every example must be",
        f"IN and OUT among those, which complementary shadow pairs give from {LIRA_MIN_SHADOWS} shadows (2 pairs) on.",
        "",
        "Folders (i in model-id order):",
    ]
    lines += [f"  experiment-{i}_{n}  {mid}" for i, mid in enumerate(ids)]
    return "\n".join(lines) + "\n"


def export_lira(store_uri: str, dest: str, progress: bool = True, *, force: bool = False) -> dict:
    """Write the store's committed shadow models in the LiRA reference code's layout under the folder dest.

    Per shadow model i of n (model-id order): `experiment-<i>_<n>/keep.npy` = trained_on over the train
    split, `experiment-<i>_<n>/scores/<epoch>.npy` = conf[train examples, queries] (float32), and
    `hparams.json` naming the model; at the top README.txt, example_ids.npy and y_train.npy.
    Returns {format, dest, models, model_ids, examples, queries, skipped}.
    """
    store, manifest = _open_store(store_uri)
    dest = _local_dest(dest)
    _check_lira_dest(dest, force)
    examples = _examples(store, manifest)
    n_e, n_q = manifest["n_examples"], len(manifest["spec"]["queries"])
    train = np.flatnonzero(examples.column("split").to_numpy(zero_copy_only=False) == "train")
    if not len(train):
        raise StoreError(f"store {store_uri} has no train examples; the LiRA layout scores membership of those")
    models = _models(store, ("shadow",))
    if not models:
        raise StoreError(f"store {store_uri} has no committed shadow models; the LiRA layout needs them "
                         "(counts.shadow in the spec)")
    expected = _layout(n_e, n_q)
    score_name = _score_name(manifest)
    skipped: list[tuple[str, str]] = []
    exported: list[str] = []
    seeds: list = []
    with _Staging(dest) as stage:
        os.mkdir(stage.tmp)
        for mid, marker in tqdm(models, desc="export lira", unit="model", disable=not progress):
            table = _read(store, mid, marker, ["example_id", "query", "conf", "trained_on"], expected, skipped)
            if table is None:
                continue
            folder = os.path.join(stage.tmp, f"experiment-{len(exported)}")  # renamed once n is known
            os.makedirs(os.path.join(folder, "scores"))
            conf = table.column("conf").to_numpy().astype(np.float32, copy=False).reshape(n_e, n_q)
            keep = table.column("trained_on").to_numpy(zero_copy_only=False)[::n_q]
            np.save(os.path.join(folder, "keep.npy"), np.ascontiguousarray(keep[train], dtype=bool))
            np.save(os.path.join(folder, "scores", score_name), np.ascontiguousarray(conf[train]))
            exported.append(mid)
            seeds.append(marker.get("seed"))
        if not exported:
            raise StoreError(f"store {store_uri}: every shadow model failed its checks ({len(skipped)}); "
                             "`ufarm run --verify` retrains them")
        n = len(exported)
        for i, (mid, seed) in enumerate(zip(exported, seeds)):
            folder = os.path.join(stage.tmp, f"experiment-{i}_{n}")
            os.rename(os.path.join(stage.tmp, f"experiment-{i}"), folder)
            with open(os.path.join(folder, "hparams.json"), "w", encoding="utf-8") as fh:
                json.dump({"model_id": mid, "role": "shadow", "seed": seed, "expid": i, "num_experiments": n,
                           "exported_by": "ufarm export --to lira"}, fh, indent=2)
        np.save(os.path.join(stage.tmp, "example_ids.npy"), train.astype(np.int32))
        labels = examples.column("label").to_numpy(zero_copy_only=False)
        np.save(os.path.join(stage.tmp, "y_train.npy"), labels[train].astype(np.int16))
        with open(os.path.join(stage.tmp, "README.txt"), "w", encoding="utf-8") as fh:
            fh.write(_lira_readme(store_uri, manifest, dest, exported, len(train), n_q, score_name))
        stage.install()
    return {"format": "lira", "dest": dest, "models": len(exported), "model_ids": exported, "examples": len(train),
            "queries": n_q, "skipped": [mid for mid, _ in skipped]}


# ------------------------------------------------------------------------------------- wide
def export_wide(store_uri: str, dest: str, roles=None, progress: bool = True, *, force: bool = False) -> dict:
    """Write one Parquet file at dest: a row per (model, example, query) of the committed models (of the
    given roles; default all) in model-id order, with the columns of WIDE_SCHEMA: model_id, role, the logits
    file's example_id, query, conf, pred, trained_on, forgotten (as stored), and examples.parquet's split,
    label and forget joined on example_id. One row group per model, written as it is read.
    Returns {format, dest, models, model_ids, rows, roles, skipped}.
    """
    roles = _check_roles(roles)
    store, manifest = _open_store(store_uri)
    dest = _local_dest(dest)
    _check_wide_dest(dest, force)
    examples = _examples(store, manifest)
    n_e, n_q = manifest["n_examples"], len(manifest["spec"]["queries"])
    models = _models(store, roles)
    if not models:
        which = f" with role {', '.join(roles)}" if roles else ""
        raise StoreError(f"store {store_uri} has no committed models{which} to export")
    expected = _layout(n_e, n_q)
    # the joined columns are the same for every model (its rows follow the run's layout, checked on read)
    rows_of = pa.array(expected[0])
    joined = [examples.column(name).combine_chunks().cast(WIDE_SCHEMA.field(name).type).take(rows_of)
              for name in ("split", "label", "forget")]
    skipped: list[tuple[str, str]] = []
    exported: list[str] = []
    with _Staging(dest) as stage:
        writer = pq.ParquetWriter(stage.tmp, WIDE_SCHEMA)
        try:
            for mid, marker in tqdm(models, desc="export wide", unit="model", disable=not progress):
                table = _read(store, mid, marker, _LOGITS_COLUMNS, expected, skipped)
                if table is None:
                    continue
                first = np.zeros(table.num_rows, np.int32)
                arrays = [pa.array([mid], pa.string()).take(first), pa.array([marker["role"]], pa.string()).take(first)]
                arrays += [table.column(name).combine_chunks().cast(WIDE_SCHEMA.field(name).type)
                           for name in _LOGITS_COLUMNS]
                writer.write_table(pa.Table.from_arrays(arrays + joined, schema=WIDE_SCHEMA),
                                   row_group_size=max(1, table.num_rows))
                exported.append(mid)
        finally:
            writer.close()
        if not exported:
            raise StoreError(f"store {store_uri}: every model to export failed its checks ({len(skipped)}); "
                             "`ufarm run --verify` retrains them")
        stage.install()
    return {"format": "wide", "dest": dest, "models": len(exported), "model_ids": exported,
            "rows": len(exported) * n_e * n_q, "examples": n_e, "queries": n_q,
            "roles": list(roles) if roles else None, "skipped": [mid for mid, _ in skipped]}


# ------------------------------------------------------------------------------- command line
def _roles_arg(text: str) -> tuple[str, ...]:
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated roles from {', '.join(ROLES)}")
    return roles


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `export` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "export", help="write a run's outputs in the LiRA reference code's layout or as one wide Parquet table",
        description="Export a run store's per-example outputs (docs/export.md).\n"
                    "  lira: one folder per committed shadow model in the layout of tensorflow/privacy's\n"
                    "        research/mi_lira_2021; its plot.py runs on it unchanged\n"
                    "  wide: one Parquet file with a row per (model, example, query)\n"
                    "Nothing partial is left behind when an export fails.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", dest="store_opt", metavar="URI", help="the run store (or give it as STORE)")
    p.add_argument("store_pos", nargs="?", metavar="STORE",
                   help="run store URI: a folder, file://... or s3://bucket/prefix (or --store URI)")
    p.add_argument("--to", required=True, nargs=2, metavar=("FORMAT", "DEST"),
                   help="lira DIR: a folder per shadow model (keep.npy, scores/) in a new or empty folder; "
                        "wide FILE.parquet: one Parquet file (local paths)")
    p.set_defaults(split_args=split_to)
    p.add_argument("--roles", type=_roles_arg, default=None,
                   help=f"wide only: comma-separated roles to export (default: all of {', '.join(ROLES)})")
    p.add_argument("--force", action="store_true",
                   help="replace an existing wide file or an earlier lira export folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def split_to(args) -> None:
    """--to FORMAT DEST -> args.to, args.dest; an unknown format is a one-line error."""
    args.to, args.dest = args.to
    if args.to not in FORMATS:
        raise StoreError(f"--to {args.to!r}: use one of {', '.join(FORMATS)}")


def cmd_export(args) -> int:
    """Run `ufarm export` and print one summary line; a StoreError (one line) on bad input."""
    progress = not getattr(args, "no_progress", False)
    force = getattr(args, "force", False)
    roles = getattr(args, "roles", None)
    if args.to == "lira":
        if roles:
            raise StoreError("--roles applies to --to wide; --to lira exports the shadow models")
        r = export_lira(args.store, args.dest, progress=progress, force=force)
        line = (f"exported {r['models']} shadow models x {r['examples']} train examples x {r['queries']} queries "
                f"to {r['dest']} in the LiRA layout (experiment-<i>_{r['models']}/keep.npy, scores/); "
                "see its README.txt")
        if r["models"] < LIRA_MIN_SHADOWS:
            line += f"; plot.py needs at least {LIRA_MIN_SHADOWS} shadows"
    elif args.to == "wide":
        r = export_wide(args.store, args.dest, roles=roles, progress=progress, force=force)
        line = (f"exported {r['rows']:,} rows ({r['models']} models x {r['examples']} examples x {r['queries']} "
                f"queries{', roles ' + ','.join(r['roles']) if r['roles'] else ''}) to {r['dest']}")
    else:
        raise StoreError(f"--to {args.to!r}: use one of {', '.join(FORMATS)}")
    if r["skipped"]:
        line += f"; left out {len(r['skipped'])} damaged: {', '.join(r['skipped'][:5])}" \
                f"{' ...' if len(r['skipped']) > 5 else ''}"
    print(line)
    return 0
