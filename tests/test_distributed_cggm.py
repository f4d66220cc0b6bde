"""CGGM under 2-process DDP (gloo, CPU) against one process with the same global batch (issue 17):

* the classifiers' gradients are *averaged* across ranks (a sum would double the step under SGD
  classifiers, as in the BraTS preset, though Adam hides it): with SGD classifiers, their weights
  after 3 steps of 8 + 8 samples equal those of one process stepping on the 16 samples;
* each rank evaluates its shard and the ``clf/*`` metric is reduced across ranks: every rank returns
  the whole split's value, the per-sample mean of copies in eval mode (tests/_ddp_cggm_worker.py).
"""

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_cggm_worker as w  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-cggm")
    mp.start_processes(w.worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_sgd_classifiers_step_on_the_mean_gradient_of_the_ranks(ranks):
    single = w.train_sgd_classifiers(w.GLOBAL_BATCH)
    for r in ranks:
        assert r["sgd"].keys() == single.keys()
        for k, v in single.items():
            torch.testing.assert_close(r["sgd"][k], v, rtol=1e-4, atol=1e-5, msg=f"classifier {k}")
    # the inputs exercise the reduction: a summed gradient (twice the learning rate under SGD) differs
    doubled = w.train_sgd_classifiers(w.GLOBAL_BATCH, lr=1.0)
    assert max(float((doubled[k] - v).abs().max()) for k, v in single.items()) > 1e-3


@pytest.mark.parametrize("kind", w.KINDS)
def test_clf_metric_of_sharded_evaluation_is_the_whole_splits(ranks, kind):
    model, method, data, task = w.eval_setup(kind)
    whole, _ = w.clf_reference(model, method, data, task)
    for r in ranks:
        got = r["clf"][kind]
        assert set(got) == {"clf/a", "clf/b"}
        for m in ("a", "b"):
            assert got[f"clf/{m}"] == pytest.approx(whole[m], rel=1e-6, abs=1e-7), (kind, m)
