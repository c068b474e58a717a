import copy

import numpy as np
import pytest

from farm.plan import derive_seed, make_plan, select_forget, shadow_membership
from farm.spec import SpecError, spec_from_dict
from tests.conftest import TINY_SPEC


def _arrays(n=200, n_classes=5):
    rng = np.random.default_rng(0)
    split = np.where(np.arange(n) < 150, "train", np.where(np.arange(n) < 175, "val", "test"))
    labels = rng.integers(0, n_classes, n)
    groups = np.arange(n) % 10
    return split, labels, groups


@pytest.mark.parametrize("n_train,n_shadow", [(150, 2), (151, 8), (10, 64)])
def test_shadow_masks_are_balanced(n_train, n_shadow):
    masks = shadow_membership(np.arange(n_train), n_shadow, run_seed=5)
    assert masks.shape == (n_shadow, n_train)
    assert (masks.sum(0) == n_shadow // 2).all()  # every example IN for exactly half the shadows
    assert (np.abs(masks.sum(1) - n_train / 2) <= 0.5).all()  # each shadow trains on half the data


def test_extending_shadows_keeps_existing_masks():
    few = shadow_membership(np.arange(100), 4, run_seed=1)
    many = shadow_membership(np.arange(100), 10, run_seed=1)
    assert np.array_equal(few, many[:4])
    assert not np.array_equal(many[0], many[2])


def test_plan_ids_seeds_and_training_sets():
    split, labels, groups = _arrays()
    spec = spec_from_dict(TINY_SPEC)
    plan = make_plan(spec, split, labels, groups)
    ids = [j.model_id for j in plan.jobs]
    assert ids[:3] == ["original-00000", "retrain-00000", "retrain-00001"]
    assert ids[-1].startswith("unlearned-finetune-") and ids[-1].endswith("-00001")
    assert len(set(j.seed for j in plan.jobs)) == len(plan.jobs)
    assert plan.jobs[0].seed == derive_seed(3, "original-00000")
    forget = plan.forget
    assert forget.sum() == round(0.1 * 150) and not forget[150:].any()
    retrain = plan.by_id()["retrain-00000"]
    assert not forget[retrain.train_idx].any() and len(retrain.train_idx) == 150 - forget.sum()
    again = make_plan(spec, split, labels, groups)
    assert [j.model_id for j in again.jobs] == ids and np.array_equal(again.forget, forget)


def test_forget_by_class_and_group():
    split, labels, groups = _arrays()
    d = copy.deepcopy(TINY_SPEC)
    d["forget"] = {"kind": "classes", "classes": [2]}
    forget = select_forget(spec_from_dict(d), split, labels, groups)
    assert np.array_equal(forget, (labels == 2) & (split == "train"))
    d["forget"] = {"kind": "classes", "classes": [7]}
    with pytest.raises(SpecError, match=r"forget.classes \[7\] do not exist"):
        select_forget(spec_from_dict(d), split, labels, groups)
    d["forget"] = {"kind": "groups", "groups": [3, 4]}
    forget = select_forget(spec_from_dict(d), split, labels, groups)
    assert np.array_equal(forget, np.isin(groups, [3, 4]) & (split == "train"))
    with pytest.raises(SpecError, match="needs a dataset with group ids"):
        select_forget(spec_from_dict(d), split, labels, None)
