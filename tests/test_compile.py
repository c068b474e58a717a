"""resources.compile: the engine's models run compiled by torch.compile and stay the same models."""
import copy
import io

import numpy as np
import torch
from torch._dynamo.utils import counters

from farm.run import prepare_run
from farm.spec import spec_from_dict
from farm.store import RunStore
from farm.train.engine import Engine
from farm.train.loops import compiled
from farm.train.models import SmallCNN
from tests.conftest import TINY_SPEC


def test_compiled_runs_give_the_models_an_uncompiled_run_gives(tmp_path, one_thread):
    """Originals, retrains, stacked shadows and lone unlearned models (finetune, and scrub, which copies the
    model it is given) with compile on: their logits equal the uncompiled run's up to float rounding, the
    store's weights have the plain module's keys, and the graphs were really compiled."""
    raw = copy.deepcopy(TINY_SPEC)
    raw["unlearn"] = [{"method": "finetune", "count": 1, "hparams": {"lr": 0.01, "epochs": 1}},
                      {"method": "scrub", "count": 1, "hparams": {"epochs": 1}}]
    torch._dynamo.reset()  # graphs another test compiled in this process would be reused, not counted
    conf, keys, graphs = {}, {}, {}
    for setting in (False, True):
        raw["resources"] = {"compile": setting}
        prep = prepare_run(spec_from_dict(raw), str(tmp_path / str(setting)))
        engine = Engine(prep.context(), threads=1)
        before = counters["stats"]["unique_graphs"]
        by_role = {role: [j for j in prep.plan.jobs if j.role == role]
                   for role in ("original", "retrain", "shadow", "unlearned")}
        for job in by_role["original"] + by_role["retrain"]:
            engine.run(job)
        graphs[setting] = counters["stats"]["unique_graphs"] - before  # training and predicting, compiled
        for job in by_role["unlearned"]:
            engine.run(job)
        engine.run_batch(by_role["shadow"])  # stacked: the stacked kernels, not the compiled forward pass
        store = RunStore(str(tmp_path / str(setting)))
        original = by_role["original"][0].model_id
        weights = store.read_weights(original, store.marker(original))
        keys[setting] = list(torch.load(io.BytesIO(weights), weights_only=True))
        table = store.read_conf()
        conf[setting] = table.conf[[table.model_ids.index(j.model_id) for j in prep.plan.jobs]]
    assert graphs[False] == 0 and graphs[True] > 0
    assert keys[True] == keys[False] == list(SmallCNN(1, 10, 8, 4).state_dict())
    np.testing.assert_allclose(conf[True], conf[False], atol=1e-4, rtol=1e-4)


def test_compiled_leaves_the_module_itself_and_off_leaves_it_alone():
    torch.manual_seed(0)
    model = SmallCNN(1, 4, 8, 4)
    x = torch.randn(3, 1, 8, 8)
    eager = model(x)
    assert compiled(model, False) is model and model(x).equal(eager)
    assert compiled(model, True) is model
    torch.testing.assert_close(model(x), eager, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == list(SmallCNN(1, 4, 8, 4).state_dict())
