"""A store grows exactly: trained in rounds (shadow pairs, retrained models, originals, unlearned models per
method) it equals, file for file, a store planned at the final counts, and a committed model is never
written again. A spec with lower counts than the store holds trains nothing and says so."""
from __future__ import annotations

import copy
import hashlib
import json
import os

from farm.cli import main
from farm.run import prepare_run, run_local
from farm.spec import spec_from_dict
from tests.conftest import TINY_SPEC

FINAL = {**copy.deepcopy(TINY_SPEC), "counts": {"original": 2, "retrain": 2, "shadow": 4},
         "unlearn": [{"method": "finetune", "count": 2, "hparams": {"lr": 0.01, "epochs": 1}},
                     {"method": "random_label", "count": 1, "hparams": {"epochs": 1}}]}
# timings and clocks differ between two trainings of the same model; everything else must not
CLOCK_FIELDS = {"train_seconds", "seconds", "finished_at", "time_ratio", "retrain_seconds_mean",
                "over_time_cutoff"}


def _round(counts: dict, unlearn: list) -> dict:
    return {**copy.deepcopy(FINAL), "counts": counts, "unlearn": unlearn}


ROUNDS = [
    _round({"shadow": 2}, []),
    _round({"shadow": 4, "retrain": 1}, []),
    _round({"shadow": 4, "retrain": 2, "original": 1}, []),
    _round({"shadow": 4, "retrain": 2, "original": 2}, FINAL["unlearn"][:1]),
    FINAL,
]


def _files(root: str) -> dict[str, tuple]:
    """relative path -> (sha256 of the bytes, or of the marker without its clock fields; inode, mtime)."""
    out = {}
    for folder in ("logits", "weights", "models"):
        for name in sorted(os.listdir(os.path.join(root, folder))) if os.path.isdir(os.path.join(root, folder)) else []:
            path = os.path.join(root, folder, name)
            data = open(path, "rb").read()
            if folder == "models":
                marker = {k: v for k, v in json.loads(data).items() if k not in CLOCK_FIELDS}
                data = json.dumps(marker, sort_keys=True).encode()
            st = os.stat(path)
            out[f"{folder}/{name}"] = (hashlib.sha256(data).hexdigest(), st.st_ino, st.st_mtime_ns)
    return out


def test_a_store_grown_in_rounds_equals_one_planned_at_the_final_counts(tmp_path):
    grown, once = str(tmp_path / "grown"), str(tmp_path / "once")
    seen: dict[str, tuple] = {}
    for raw in ROUNDS:
        result = run_local(prepare_run(spec_from_dict(raw), grown), progress=False)
        assert not result.failed
        now = _files(grown)
        for rel, before in seen.items():  # a committed model is never written again
            assert now[rel] == before, f"{rel} was rewritten"
        assert set(result.trained) == {rel[len("models/"):-len(".json")] for rel in set(now) - set(seen)
                                       if rel.startswith("models/")}
        seen = now
    assert not run_local(prepare_run(spec_from_dict(FINAL), once), progress=False).failed
    a, b = _files(grown), _files(once)
    assert sorted(a) == sorted(b) and len(a) >= 2 * 12
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}


def test_lower_counts_train_nothing_and_say_so(tmp_path, capsys):
    import yaml

    store = str(tmp_path / "run")
    assert not run_local(prepare_run(spec_from_dict(FINAL), store), progress=False).failed
    before = _files(store)
    smaller = tmp_path / "smaller.yaml"
    finetune_once = [{**FINAL["unlearn"][0], "count": 1}]
    smaller.write_text(yaml.safe_dump(_round({"shadow": 2, "retrain": 1, "original": 1}, finetune_once)))
    assert main(["run", str(smaller), "--store", store, "--executor", "local", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 to train" in out
    assert ("the store holds 6 more models than this spec plans (original 1, retrain 1, shadow 2, "
            "unlearned 2); they stay, and ufarm evaluate uses every committed model") in out
    assert _files(store) == before


def test_originals_cannot_change_under_committed_unlearned_models(tmp_path, capsys):
    """Unlearned model i starts from original i mod counts.original: fewer (or more) originals would make a
    committed unlearned model another original's child. Refused in one line, nothing written."""
    import yaml

    store = str(tmp_path / "run")
    assert not run_local(prepare_run(spec_from_dict(FINAL), store), progress=False).failed
    before = _files(store)
    fewer = tmp_path / "fewer.yaml"
    fewer.write_text(yaml.safe_dump(_round({"shadow": 4, "retrain": 2, "original": 1}, FINAL["unlearn"][:1])))
    assert main(["run", str(fewer), "--store", store, "--executor", "local", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ufarm: error: counts.original: store ") and "made from original-00001" in err \
        and "starts it from original-00000" in err and len(err.splitlines()) == 1
    assert _files(store) == before
