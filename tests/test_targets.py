"""Precision-driven runs: the `targets` section and its flags, how a round is sized, the targeted figures
equal the report's, and `ufarm run` with targets trains in rounds, stops and resumes (local and Ray)."""
from __future__ import annotations

import copy
import json
import math
import os
import sys

import pytest
import yaml

from conftest import TINY_SPEC, ufarm
from evaluation.precision import Z95
from evaluation.report import evaluate_store
from evaluation.report.targets import FIGURES, Reading, read_figures
from farm.cli import main
from farm.rounds import (FigureStatus, assess, current_counts, figure_line, next_counts, resume_counts,
                         spent_hours)
from farm.spec import SpecError, spec_from_dict
from farm.targets import FIGURE_ROLES
from farm.targets import Z95 as FARM_Z95

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "evaluation"))
from synthetic_store import build_store  # noqa: E402


def _spec(targets: dict, **counts):
    raw = copy.deepcopy(TINY_SPEC)
    raw["counts"] = {"original": 4, "retrain": 4, "shadow": 4, **counts}
    raw["unlearn"][0]["count"] = 4
    raw["targets"] = targets
    return spec_from_dict(raw)


def test_the_figure_tables_agree():
    assert set(FIGURE_ROLES) == set(FIGURES)
    assert FARM_Z95 == pytest.approx(Z95, abs=1e-12)


@pytest.mark.parametrize("targets, field", [
    ({"figures": {"auc": 0.01}}, "targets.figures.auc"),
    ({"figures": {"lira_auc": 0}}, "targets.figures.lira_auc"),
    ({"figures": {"lira_auc": {"sd": 0.01}}}, "targets.figures.lira_auc"),
    ({"figures": {}}, "targets.figures"),
    ({"figures": {"f": 0.1}, "budget": {"models": 5}}, "targets.budget.models"),
    ({"figures": {"f": 0.1}, "budget": {"device_hours": -1}}, "targets.budget.device_hours"),
    ({"figures": {"f": 0.1}, "max_growth": 1}, "targets.max_growth"),
    ({"figures": {"f": 0.1}, "until": 3}, "targets: unknown field"),
])
def test_bad_targets_are_one_line_errors_naming_the_field(targets, field):
    with pytest.raises(SpecError) as err:
        _spec(targets)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_targets_need_models_to_start_from():
    with pytest.raises(SpecError, match="targets.figures.lira_auc is measured over shadows"):
        _spec({"figures": {"lira_auc": 0.05}}, shadow=2)
    raw = copy.deepcopy(TINY_SPEC)
    raw.pop("unlearn")
    raw["targets"] = {"figures": {"f_ratio": 0.1}}
    with pytest.raises(SpecError, match="targets.figures.f_ratio is measured per unlearning method"):
        spec_from_dict(raw)


def test_targets_are_not_part_of_the_stores_identity():
    a, b = _spec({"figures": {"lira_auc": 0.05}}), _spec({"figures": {"f": 0.01}, "budget": {"models": 900}})
    assert a.identity_hash() == b.identity_hash() and a.targets != b.targets
    assert spec_from_dict(a.to_dict()).targets == a.targets  # the manifest's round trip


@pytest.mark.parametrize("args, field", [
    (["--target", "auc=0.1"], "targets.figures.auc"),
    (["--target", "lira_auc"], "--target 'lira_auc'"),
    (["--target", "lira_auc=sd:0.1"], "--target 'lira_auc=sd:0.1'"),
    (["--target", "lira_auc=abc"], "--target 'lira_auc=abc'"),
    (["--target", "lira_auc=0.1", "--budget-models", "3"], "targets.budget.models: 3 is below"),
    (["--target", "lira_auc=0.1", "--budget-hours", "0"], "targets.budget.device_hours"),
])
def test_bad_target_flags_write_nothing(tmp_path, tiny_spec_file, capsys, args, field):
    store = tmp_path / "store"
    spec = tmp_path / "spec.yaml"
    raw = {**TINY_SPEC, "counts": {"original": 1, "retrain": 2, "shadow": 4}}
    spec.write_text(yaml.safe_dump(raw))
    assert main(["run", str(spec), "--store", str(store), "--executor", "local", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ufarm: error: {field}") and "\n" not in err, err
    assert not store.exists()


def _status(figure, se, needed, met=False, method=None):
    return FigureStatus(figure, method, 0.5, se, 0.01, met, needed)


def test_a_round_grows_each_role_to_what_its_figures_need_within_max_growth():
    spec = _spec({"figures": {"lira_auc": 0.01, "f": 0.02}})
    key = f"{spec.unlearn[0].method_id}-{spec.unlearn[0].hparams_hash}"
    counts, why = next_counts(spec, [_status("lira_auc", 0.02, {"shadow": 9}),
                                     _status("f", float("nan"), {"unlearned": None, "retrain": 100}, method=key)], {})
    # shadows: 9 rounded up to a pair; unlearned: unknown, so x4; retrained: 100 capped at x4;
    # originals follow the unlearned models (one per original)
    assert counts == {"original": 16, "retrain": 16, "shadow": 10, "unlearn": [16]} and why == ""
    # a met figure asks for nothing; an unmet one asks for at least one step
    counts, _ = next_counts(spec, [_status("lira_auc", 0.005, {"shadow": 2}, met=True),
                                   _status("f", 0.03, {"unlearned": 3, "retrain": 3}, method=key)], {})
    assert counts == {"original": 5, "retrain": 5, "shadow": 4, "unlearn": [5]}


def test_originals_stay_when_methods_have_several_models_per_original():
    spec = _spec({"figures": {"f": 0.02}}, original=2)
    key = f"{spec.unlearn[0].method_id}-{spec.unlearn[0].hparams_hash}"
    counts, _ = next_counts(spec, [_status("f", 0.04, {"unlearned": 16, "retrain": 16}, method=key)], {})
    assert counts["original"] == 2 and counts["unlearn"] == [16]


def test_both_budgets_scale_a_round_down_and_then_stop_the_run():
    spec = _spec({"figures": {"lira_auc": 0.01, "f": 0.02}, "budget": {"models": 40}})
    key = f"{spec.unlearn[0].method_id}-{spec.unlearn[0].hparams_hash}"
    statuses = [_status("lira_auc", 0.02, {"shadow": 9}), _status("f", 0.1, {"unlearned": 60, "retrain": 60},
                                                                    method=key)]
    counts, _ = next_counts(spec, statuses, {})
    total = counts["original"] + counts["retrain"] + counts["shadow"] + sum(counts["unlearn"])
    assert 36 <= total <= 40 and counts["shadow"] % 2 == 0 and counts["original"] == counts["unlearn"][0]
    # 16 models in the store that took 450 s each on 1 CPU = 2 device-hours; a budget of 2.5 h leaves 0.5 h,
    # which is 4 more models
    markers = {f"m{i}": {"role": "shadow", "seconds": 450.0} for i in range(16)}
    spec_h = _spec({"figures": {"lira_auc": 0.01}, "budget": {"device_hours": 2.5}})
    assert spent_hours(spec_h, markers) == pytest.approx(2.0)
    counts, _ = next_counts(spec_h, [_status("lira_auc", 0.02, {"shadow": 40})], markers)
    assert counts["shadow"] == 8
    spent = {f"m{i}": {"role": "shadow", "seconds": 600.0} for i in range(16)}
    counts, why = next_counts(spec_h, [_status("lira_auc", 0.02, {"shadow": 40})], spent)
    assert counts is None and "2.5 device-hours" in why


def test_assess_sizes_each_role_by_the_square_of_the_se_ratio():
    spec = _spec({"figures": {"f": {"se": 0.01}, "lira_auc": 0.0196}})
    st = assess([Reading("f", "k", 0.3, 0.02, {"unlearned": 8, "retrain": 10}),
                 Reading("lira_auc", None, 0.6, 0.005, {"shadow": 16})], spec.targets)
    assert st[0].needed == {"unlearned": 32, "retrain": 40} and not st[0].met
    assert st[1].met and st[1].se_target == pytest.approx(0.0196 / Z95)
    nan = assess([Reading("f", "k", math.nan, math.nan, {"unlearned": 1, "retrain": 1}, "too few")], spec.targets)
    assert nan[0].needed == {"unlearned": None, "retrain": None} and not nan[0].met


def test_a_floor_more_models_do_not_shrink_sizes_the_round_and_can_put_a_target_out_of_reach():
    from evaluation.precision import models_needed

    # variance 0.02^2 from 10 models, of which 0.01^2 does not shrink: a target SE of 0.015 needs
    # 10 * (4e-4 - 1e-4) / (2.25e-4 - 1e-4) = 24 models; without the floor 10 * (0.02 / 0.015)^2 = 17.8 -> 18
    assert models_needed(10, 0.02, 0.015, z=1.0, floor=0.01) == 24
    assert models_needed(10, 0.02, 0.015, z=1.0) == 18
    assert models_needed(10, 0.02, 0.015, z=1.0, floor=0.016) == -1
    spec = _spec({"figures": {"lira_auc": 0.0196, "f": 0.5}})
    st = assess([Reading("lira_auc", None, 0.6, 0.012, {"shadow": 16}, se_floor=0.011),
                 Reading("f", "k", 0.3, 0.1, {"unlearned": 8, "retrain": 8})], spec.targets)
    assert st[0].unreachable and st[0].needed == {"shadow": -1} and st[1].met
    assert "out of reach of more models" in figure_line(st[0])
    # an out-of-reach figure asks for no models
    assert next_counts(spec, st, {}) == (None, "no target that more models can improve is left")


def test_resume_starts_from_the_stores_last_counts():
    spec = _spec({"figures": {"lira_auc": 0.01}})
    manifest = {"spec": _spec({"figures": {"lira_auc": 0.01}}, shadow=12, retrain=2).to_dict()}
    assert current_counts(resume_counts(spec, manifest)) == {"original": 4, "retrain": 4, "shadow": 12,
                                                             "unlearn": [4]}
    assert resume_counts(spec, {"spec": {"counts": "damaged"}}) == spec


def test_the_targeted_figures_equal_the_reports(tmp_path):
    build_store(str(tmp_path), n_shadow=16, gap=0.5, n_retrain=16, n_unlearned=16, n_originals=8,
                unlearned_shift=0.3)
    rep = evaluate_store(str(tmp_path), out=str(tmp_path / "report"), progress=False)
    got = {(r.figure, r.method): r for r in read_figures(str(tmp_path), list(FIGURES))}
    online = rep["lira"]["modes"]["online"]
    key = next(iter(rep["methods"]))
    comp = rep["methods"][key]["competition"]
    want = {("lira_auc", None): (online["auc"], online["auc_se"]),
            ("lira_tpr_at_1pct", None): (online["tpr_at_fpr"]["0.01"], online["tpr_at_fpr_se"]["0.01"]),
            ("lira_tpr_at_0.1pct", None): (online["tpr_at_fpr"]["0.001"], online["tpr_at_fpr_se"]["0.001"]),
            ("f_null", None): (rep["f_null"]["f_null"], rep["f_null"]["se"]),
            ("f", key): (comp["forgetting_quality"], comp["se"]),
            ("f_ratio", key): (comp["equal_count"]["ratio"], comp["equal_count"]["ratio_se"])}
    assert set(got) == set(want)
    for k, (value, se) in want.items():
        assert (got[k].value, got[k].se) == (value, se), k
    few = read_figures(str(tmp_path), ["f"], methods=[key, "other-00000000"])
    assert [r.method for r in few] == [key, "other-00000000"] and math.isnan(few[1].value)


def _targets_spec(tmp_path, targets: dict, counts: dict, unlearn_count: int = 2):
    raw = copy.deepcopy(TINY_SPEC)
    raw["counts"] = counts
    raw["unlearn"][0]["count"] = unlearn_count
    raw["targets"] = targets
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_run_with_targets_trains_in_rounds_stops_and_resumes(tmp_path, capsys):
    spec = _targets_spec(tmp_path, {"figures": {"f_ratio": 0.5, "lira_auc": 0.2}, "budget": {"models": 40}},
                         {"original": 2, "retrain": 2, "shadow": 4})
    store = str(tmp_path / "store")
    rc = main(["run", str(spec), "--store", store, "--executor", "local", "--no-progress"])
    out = capsys.readouterr().out
    log = json.loads((tmp_path / "store" / "rounds.json").read_text())
    assert (rc, log["stop"]) in ((0, "met"), (3, "budget")), out
    rounds = log["rounds"]
    assert len(rounds) >= 2 and "round 2:" in out
    sizes = [r["models_in_store"] for r in rounds]
    assert sizes == sorted(sizes) and sizes[-1] <= 40
    # round 1 could not measure F / F_null (fewer than 3 models per side); the last round did, and states it as
    # the report does
    first = {f["figure"]: f for f in rounds[0]["figures"]}
    assert math.isnan(first["f_ratio"]["se"]) and not first["f_ratio"]["met"]
    last = {f["figure"]: f for f in rounds[-1]["figures"]}
    rep = evaluate_store(store, out=str(tmp_path / "report"), progress=False)
    comp = rep["methods"][last["f_ratio"]["method"]]["competition"]["equal_count"]
    assert (last["f_ratio"]["value"], last["f_ratio"]["se"]) == (comp["ratio"], comp["ratio_se"])
    assert last["lira_auc"]["se"] == rep["lira"]["modes"]["online"]["auc_se"]
    # started again: the first round trains nothing and the run stops the same way
    again = main(["run", str(spec), "--store", store, "--executor", "local", "--no-progress"])
    out = capsys.readouterr().out
    assert again == rc and "0 to train" in out.splitlines()[1]
    assert json.loads((tmp_path / "store" / "rounds.json").read_text())["stop"] == log["stop"]
    assert main(["status", store]) == 0
    out = capsys.readouterr().out
    assert "precision targets" in out and "f_ratio[" in out and "last precision-driven run:" in out


def test_a_run_with_targets_on_ray(ray_address, tmp_path):
    # F_null cannot be measured from 2 retrained models (3 per side in every draw): round 2 grows them 4x, and
    # the budget of 8 models stops the run there
    spec = _targets_spec(tmp_path, {"figures": {"f_null": 0.0001}, "budget": {"models": 8}},
                         {"original": 1, "retrain": 2}, unlearn_count=1)
    r = ufarm("run", spec, "--store", tmp_path / "store", "--no-progress", env={"RAY_ADDRESS": ray_address})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "round 2: 1 original, 6 retrain, 1 finetune" in r.stdout and "allows no further model" in r.stdout
    assert len(os.listdir(tmp_path / "store" / "models")) == 8


def test_a_target_below_its_floor_stops_the_run_as_out_of_reach(tmp_path, capsys):
    spec = _targets_spec(tmp_path, {"figures": {"lira_auc": 0.0001}}, {"original": 1, "shadow": 4}, unlearn_count=1)
    assert main(["run", str(spec), "--store", str(tmp_path / "store"), "--executor", "local", "--no-progress"]) == 3
    out = capsys.readouterr().out
    assert "out of reach of more models" in out and "round 2" not in out
    assert json.loads((tmp_path / "store" / "rounds.json").read_text())["stop"] == "unreachable"
