"""Data-parallel training (DDP, gloo, 2 CPU processes) matches one process with the same global batch."""

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_ddp_worker.worker, args=(2, _free_port(), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _ddp_worker.train_all(_ddp_worker.GLOBAL_BATCH)
    return ranks, single, out


@pytest.mark.parametrize("method", ["cggm", "joint"])
def test_replicas_identical_after_50_steps(runs, method):
    (r0, r1), *_ = runs
    assert r0[method]["steps"] == r1[method]["steps"] == 50
    for part in ("model", "method"):
        assert r0[method][part].keys() == r1[method][part].keys()
        for k in r0[method][part]:
            assert torch.equal(r0[method][part][k], r1[method][part][k]), f"{part} {k} differs between ranks"
    if method == "cggm":
        assert r0[method]["method"], "CGGM's classifiers were not compared"
        for k, v in r0[method]["records"].items():  # the same B (and eps, cos, L_gm) on every rank
            assert v == r1[method]["records"][k], f"record {k} differs between ranks"


@pytest.mark.parametrize("method", ["cggm", "joint"])
def test_ddp_equals_single_process_with_the_same_global_batch(runs, method):
    (r0, _), single, _ = runs
    assert single[method]["steps"] == 50
    for part in ("model", "method"):
        for k, v in single[method][part].items():
            torch.testing.assert_close(r0[method][part][k], v, rtol=1e-4, atol=1e-5, msg=f"{part} {k}")
    for k, v in single[method]["records"].items():
        torch.testing.assert_close(torch.tensor(r0[method]["records"][k]), torch.tensor(v), rtol=1e-3, atol=1e-4,
                                   msg=f"record {k}")
    # the training loss is the global batch's (all-reduced), not rank 0's half
    for a, b in zip(r0[method]["history"], single[method]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["cggm", "joint"])
def test_only_rank_0_writes_files(runs, method):
    *_, out = runs
    assert sorted(p.name for p in (out / f"{method}-rank0").iterdir()) == [
        "best.pt", "history.json", "last.pt", "metrics.jsonl", "records.json", "result.json"]
    assert not (out / f"{method}-rank1").exists()


@pytest.mark.parametrize("n", [32, 37, 17, 3])
def test_a_global_batch_is_the_union_of_the_ranks_batches(n):
    """Rank shards of global batch b are the single process's batch b (the last, short one is padded
    by wrapping, so every rank has as many batches and rows)."""
    from cggm.data import BatchIterator

    class Rows:
        def __len__(self):
            return n

        def get_batch(self, idx):
            return idx

    single = [b.tolist() for b in BatchIterator(Rows(), 16, True, seed=3, epoch=1)]
    shards = [[b.tolist() for b in BatchIterator(Rows(), 8, True, seed=3, epoch=1, rank=r, world_size=2)]
              for r in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1])
    for b, (full, a, c) in enumerate(zip(single, *shards)):
        assert len(a) == len(c)
        if (b + 1) * 16 <= n:
            assert sorted(full) == sorted(a + c)
        else:
            assert set(full) <= set(a + c)


OTHER_METHODS = [m for m in __import__("cggm").list_methods() if m not in ("cggm", "joint")]


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_method_keeps_replicas_identical_or_refuses_ddp(runs, method):
    """Every other registered method either trains under DDP with bitwise-identical replicas (its
    statistics come from all ranks) or refuses DDP with a clear message when it is bound."""
    (r0, r1), *_ = runs
    from cggm.methods import build_method

    if not build_method(method).support.ddp:
        assert "does not run under DDP" in r0[method]["refused"]
        return
    assert "refused" not in r0[method], r0[method].get("refused")
    assert r0[method]["steps"] == r1[method]["steps"] == 50
    for part in ("model", "method"):
        for k in r0[method][part]:
            assert torch.equal(r0[method][part][k], r1[method][part][k]), f"{method}: {part} {k} differs between ranks"


def test_sharded_evaluation_equals_one_process(tmp_path):
    """Under DDP each rank evaluates its shard (no sample twice, none padded in) and the metric
    states are synced: every rank returns what one process returns on the whole split."""
    mp.start_processes(_ddp_worker.eval_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"eval{r}.pt", weights_only=False) for r in range(2)]
    single = _ddp_worker.evaluate_all()
    n = _ddp_worker.EVAL_N
    for kind, ref in single.items():
        assert ref["seen"] == n
        # rank r forwards samples r, r + 2, ...: 19 and 18 of 37
        assert [r[kind]["seen"] for r in ranks] == [(n + 1) // 2, n // 2], kind
        for r in ranks:
            assert r[kind]["metrics"].keys() == ref["metrics"].keys(), kind
            for name, value in ref["metrics"].items():
                assert r[kind]["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), (kind, name)
