"""evaluate_store and `ufarm evaluate` on a tiny real store trained in-process (no Ray)."""
import copy
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.competition import final_score, forgetting_quality, per_example_epsilons
from evaluation.lira import lira_leave_pair_out, roc_metrics
from evaluation.report import ReportError, evaluate_store
from evaluation.rmia import rmia_leave_pair_out
from evaluation.twosample import per_example_tests
from evaluation.ulira import ulira_attack
from farm.cli import main
from farm.store import RunStore, StoreError, logits_table
from tests.conftest import TINY_SPEC

N_BOOT = 4
FIGURES = ("lira_roc.png", "epsilon_hist.png", "forgetting_quality.png", "accuracy_per_role.png")


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    from farm.run import prepare_run, run_local
    from farm.spec import spec_from_dict

    raw = copy.deepcopy(TINY_SPEC)
    raw["counts"] = {"original": 4, "retrain": 8, "shadow": 4}
    raw["unlearn"][0]["count"] = 4  # one per original: U-LiRA's folds take 2 originals each
    raw["forget"]["fraction"] = 0.04  # 58 forget examples keep the epsilon searches short
    raw["time_cutoff"] = 0.3  # the report marks unlearned models slower than 0.3 x mean retraining time
    uri = str(tmp_path_factory.mktemp("report") / "run")
    result = run_local(prepare_run(spec_from_dict(raw), uri), progress=False)
    assert not result.failed and len(result.trained) == 20
    return uri


@pytest.fixture(scope="module")
def report(base_store):
    return evaluate_store(base_store, n_boot=N_BOOT, max_examples=None, progress=False)


def _copy(base, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(base, dst)
    return dst


def _examples(uri):
    ex = RunStore(uri).read_examples()
    split = np.asarray(ex.column("split").to_numpy(zero_copy_only=False)).astype(str)
    return split, np.asarray(ex.column("forget").to_numpy(zero_copy_only=False), dtype=bool)


def test_report_files_and_fields(base_store, report):
    folder = os.path.join(base_store, "report")
    assert report["out"] == folder
    for name in FIGURES + ("leaking_finetune-" + report["methods"][next(iter(report["methods"]))]["hparams_hash"]
                           + ".png", "report.json", "report.md", "per_example_lira.parquet"):
        path = os.path.join(folder, name)
        assert os.path.getsize(path) > 0, name
        if name.endswith(".png"):
            assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    on_disk = json.load(open(os.path.join(folder, "report.json")))
    assert on_disk == {k: v for k, v in report.items() if k != "out"}
    assert report["models"] == {"original": 4, "retrain": 8, "shadow": 4, "unlearned:" + next(iter(report["methods"])): 4}
    assert report["nonfinite"] == []
    assert set(report["lira"]["modes"]) == {"online", "offline", "global"}
    for v in list(report["lira"]["modes"].values()) + [report["lira"]["rmia"]]:
        assert set(v["tpr_at_fpr"]) == {"0.001", "0.01"} and 0 <= v["auc"] <= 1
    (key, m), = report["methods"].items()
    assert key.startswith("finetune-") and m["hparams"] == {"epochs": 1, "lr": 0.01}
    c = m["competition"]
    for field in ("forgetting_quality", "ci_low", "ci_high", "se", "equal_count", "final_score", "epsilon"):
        assert field in c, field
    assert c["ci_low"] <= c["forgetting_quality"] <= c["ci_high"]
    ec = c["equal_count"]
    assert ec["n_per_side"] == 3 and ec["f_ci"][0] <= ec["f"] <= ec["f_ci"][1]
    assert ec["f_null_ci"][0] <= ec["f_null"] <= ec["f_null_ci"][1]
    assert m["n_originals"] == 4 and "dependence" not in m
    assert set(m["two_sample"]) >= {"forget", "retain_control", "test_control"}
    assert 0 <= m["ulira"]["accuracy"] <= 1 and m["cost"]["ratio"] > 0
    assert set(m["ulira"]) >= {"forget", "retain_control", "test_control"}
    assert set(report["utility"]) == {"original", "retrain", "shadow", f"unlearned:{key}"}
    md = open(os.path.join(folder, "report.md")).read()
    assert "LiRA online" in md and "forgetting quality F" in md and "![LiRA ROC](lira_roc.png)" in md
    assert "- time cut-off 0.300 of retraining: " in md


def test_numbers_equal_direct_computation(base_store, report):
    store = RunStore(base_store)
    split, forget = _examples(base_store)
    train, test = split == "train", split == "test"
    sh = store.read_conf(roles=("shadow",))
    conf, member = sh.conf[:, train], sh.trained_on[:, train]
    lira = report["lira"]
    assert lira["variance"] == "global"  # 4 shadows: 1 reference per side after leaving a pair out
    assert lira["references"].startswith("leave-pair-out")
    partner = np.array([1, 0, 3, 2])  # shadow-00000 with 00001, 00002 with 00003
    assert (member[0] != member[1]).all() and (member[2] != member[3]).all()
    for mode in ("online", "offline", "global"):
        scores = lira_leave_pair_out(conf, member, partner, mode=mode, variance="global")
        want = roc_metrics(scores.ravel(), member.ravel())
        got = lira["modes"][mode]
        assert got["auc"] == pytest.approx(want["auc"], abs=1e-12)
        assert got["tpr_at_fpr"]["0.01"] == pytest.approx(want["tpr_at_fpr"][0.01], abs=1e-12)
        assert got["auc_ci"][0] <= got["auc"] <= got["auc_ci"][1]
        if mode == "online":
            online = scores
    rs = rmia_leave_pair_out(conf, member, partner, sh.conf[:, test])
    assert lira["rmia"]["auc"] == pytest.approx(roc_metrics(rs.ravel(), member.ravel())["auc"], abs=1e-12)
    # per-example vulnerability: within each pair, does the IN member score above the OUT member?
    vul = pq.read_table(os.path.join(base_store, "report", "per_example_lira.parquet")).column("vulnerability")
    vul = vul.to_numpy()
    for e in (0, 5, 17):
        wins = [float(online[a, e] > online[b, e]) + 0.5 * float(online[a, e] == online[b, e])
                for a, b in ((0, 1), (2, 3)) for a, b in [(a, b) if member[a, e] else (b, a)]]
        assert vul[e] == pytest.approx(np.mean(wins), abs=1e-12)
    assert lira["vulnerability"]["chance_fraction_ge_0.9"] == pytest.approx(0.25)  # both of 2 pairs by chance

    # the competition on the forget set with query 0
    markers = store.markers()
    r = store.read_conf(roles=("retrain",))
    u = store.read_conf(roles=("unlearned",))
    r0, u0 = r.conf[:, forget, 0], u.conf[:, forget, 0]
    (key, m), = report["methods"].items()
    c = m["competition"]
    f = forgetting_quality(u0, r0)
    assert c["forgetting_quality"] == pytest.approx(f, abs=1e-15)
    eps = per_example_epsilons(u0, r0)
    per_ex = pq.read_table(os.path.join(base_store, "report", f"per_example_{key}.parquet"))
    np.testing.assert_array_equal(per_ex.column("epsilon").to_numpy(), eps)
    np.testing.assert_array_equal(per_ex.column("example_id").to_numpy(), np.flatnonzero(forget))
    acc = {role: {s: [markers[i]["accuracy"][s] for i in ids] for s in ("retain", "test")}
           for role, ids in (("u", u.model_ids), ("r", r.model_ids))}
    assert c["final_score"] == pytest.approx(final_score(f, acc["u"]["retain"], acc["u"]["test"],
                                                         acc["r"]["retain"], acc["r"]["test"]), rel=1e-12)
    ec = c["equal_count"]
    assert report["f_null"]["f_null"] == ec["f_null"] and report["f_null"]["n_per_side"] == ec["n_per_side"]
    if ec["f_null"] > 0:
        assert ec["ratio"] == pytest.approx(ec["f"] / ec["f_null"])
    tests = per_example_tests(u0, r0, 0.05)
    assert m["two_sample"]["forget"]["ks_fraction"] == pytest.approx(tests["ks_fraction"])
    assert m["two_sample"]["forget"]["mw_fraction"] == pytest.approx(tests["mw_fraction"])
    parents = [markers[i]["parent"] for i in u.model_ids]
    assert len(set(parents)) == 4
    ul = ulira_attack(u.conf[:, forget], r.conf[:, forget], folds=2, seed=0, groups_unlearned=parents)
    assert m["ulira"]["accuracy"] == pytest.approx(ul["accuracy"], abs=1e-15)
    # utility and cost from the markers
    shadow_retain = [markers[i]["accuracy"]["retain"] for i in sh.model_ids]
    assert report["utility"]["shadow"]["retain"]["mean"] == pytest.approx(np.mean(shadow_retain))
    ratio = np.mean([markers[i]["train_seconds"] for i in u.model_ids]) / np.mean(
        [markers[i]["train_seconds"] for i in r.model_ids])
    assert m["cost"]["ratio"] == pytest.approx(ratio)
    mean_r = np.mean([markers[i]["train_seconds"] for i in r.model_ids])
    over = [i for i in u.model_ids if markers[i]["train_seconds"] / mean_r > 0.3]
    assert m["cost"]["time_cutoff"] == 0.3 and sorted(m["cost"]["over_time_cutoff"]) == sorted(over)


def test_max_examples_method_filter_and_out_folder(base_store, tmp_path):
    out = str(tmp_path / "elsewhere")
    rep = evaluate_store(base_store, out=out, method="finetune", n_boot=0, max_examples=20, progress=False)
    assert rep["out"] == out and os.path.exists(os.path.join(out, "report.json"))
    (key, m), = rep["methods"].items()
    assert m["forget_examples_used"] == 20 and m["two_sample"]["retain_control"]["n_examples"] == 20
    assert rep["methods"] == evaluate_store(base_store, out=out, method=key, n_boot=0, max_examples=20,
                                            progress=False)["methods"]
    with pytest.raises(ReportError, match="unknown method 'nope'.*finetune"):
        evaluate_store(base_store, out=out, method="nope", progress=False)


def test_too_few_models_messages(base_store, tmp_path):
    uri = _copy(base_store, tmp_path)
    shutil.rmtree(os.path.join(uri, "report"), ignore_errors=True)
    for mid in ("shadow-00002", "shadow-00003", "retrain-00002", "retrain-00003", "retrain-00004",
                "retrain-00005", "retrain-00006", "retrain-00007"):
        os.remove(os.path.join(uri, "models", f"{mid}.json"))
    for mid in sorted(os.listdir(os.path.join(uri, "models"))):
        if mid.startswith("unlearned") and not mid.endswith(("00000.json", "00001.json")):
            os.remove(os.path.join(uri, "models", mid))
    rep = evaluate_store(uri, n_boot=2, max_examples=30, progress=False)
    assert "LiRA needs at least 4 shadow models" in rep["lira"]["message"] and "modes" not in rep["lira"]
    assert "F_null needs at least 3 retrained models per side" in rep["f_null"]["message"]
    (key, m), = rep["methods"].items()
    assert "forgetting_quality" in m["competition"]  # 2 + 2 models are enough for the score
    assert "no equal-count comparison" in m["competition"]["equal_count_message"]
    assert "U-LiRA needs at least 4 originals" in m["ulira"]["message"]
    assert any("F_null needs at least 3" in x for x in rep["messages"])
    md = open(os.path.join(uri, "report", "report.md")).read()
    assert "U-LiRA needs at least 4" in md and "LiRA needs at least 4 shadow models" in md
    # one more model gone: nothing is computable -> an error that says what is needed
    os.remove(os.path.join(uri, "models", "retrain-00001.json"))
    os.remove(os.path.join(uri, "models", "shadow-00001.json"))
    with pytest.raises(ReportError, match="too few models.*at least 4 shadows.*at least 2 unlearned"):
        evaluate_store(uri, progress=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_conf_reported_by_model_id(base_store, report, tmp_path):
    uri = _copy(base_store, tmp_path)
    store = RunStore(uri)
    manifest = store.read_manifest()
    n_e, n_q, n_c = manifest["n_examples"], len(manifest["spec"]["queries"]), manifest["n_classes"]
    labels = np.asarray(store.read_examples().column("label").to_numpy(), dtype=np.int64)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n_e, n_q, n_c)).astype(np.float32)
    logits[[3, 7], 0, :] = np.nan
    logits[11, 1, :] = np.inf
    split, forget = _examples(uri)
    table = logits_table(labels, logits, split == "train", forget, keep_logits=False)
    store.write_model("retrain-00099", table, {"role": "retrain", "accuracy": {"retain": 0.5, "test": 0.5},
                                               "train_seconds": 1.0, "seconds": 1.0})
    rep = evaluate_store(uri, n_boot=N_BOOT, max_examples=None, progress=False)
    (bad,) = rep["nonfinite"]
    assert bad["model_id"] == "retrain-00099" and bad["role"] == "retrain"
    assert bad["n_examples"] == 3 and bad["first_example_ids"] == [3, 7, 11] and bad["n_nan"] > 0
    assert rep["messages"][0].startswith("model retrain-00099 (retrain) has")
    # the model is left out of every statistic: the numbers equal those of the clean store
    assert rep["methods"] == report["methods"] and rep["f_null"] == report["f_null"]
    assert rep["utility"]["retrain"] == report["utility"]["retrain"]
    md = open(os.path.join(uri, "report", "report.md")).read()
    assert "| retrain-00099 | retrain |" in md


def test_cli_evaluate_and_exit_codes(base_store, tmp_path, capsys):
    out = str(tmp_path / "cli-report")
    assert main(["evaluate", base_store, "--out", out, "--n-boot", "0", "--max-examples", "20", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "LiRA online: AUC" in printed and f"report: {out}/report.md" in printed and "finetune-" in printed
    assert os.path.exists(os.path.join(out, "report.md"))
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, expected in (
        (["evaluate", str(empty)], "is not a run store"),
        (["evaluate", base_store, "--method", "nope", "--out", out], "unknown method 'nope'"),
    ):
        assert main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ufarm: error: ") and expected in err[0]
    few = _copy(base_store, tmp_path, "few")
    for name in os.listdir(os.path.join(few, "models")):
        if name != "shadow-00000.json":
            os.remove(os.path.join(few, "models", name))
    assert main(["evaluate", few, "--no-progress"]) == 2
    assert "too few models" in capsys.readouterr().err
    assert issubclass(ReportError, StoreError) and issubclass(ReportError, ValueError)


def test_report_written_to_s3(base_store, bucket):
    import boto3

    rep = evaluate_store(base_store, out=f"s3://{bucket}/reports/a", n_boot=0, max_examples=10, progress=False)
    assert rep["out"] == f"s3://{bucket}/reports/a"
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="reports/a/")["Contents"]}
    assert {"reports/a/report.json", "reports/a/report.md", "reports/a/lira_roc.png"} <= keys
    body = json.loads(s3.get_object(Bucket=bucket, Key="reports/a/report.json")["Body"].read())
    assert body["methods"] == rep["methods"]
