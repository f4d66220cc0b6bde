"""Helpers for CGGM's classifiers under evaluation and DDP (tests/test_clf_metric.py,
tests/test_distributed_cggm.py): a fixed model and CGGM with dropout classifiers on an odd-sized split,
the independent reference of each classifier's ``clf/*`` metric, and the 2-process workers."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

EVAL_N = 37  # batches of 8 leave a short last batch of 5; 2 ranks hold 19 and 18 samples
KINDS = ("classification", "regression")


def eval_setup(kind: str):
    """(model, cggm, dataset, task): a fixed MLP and a CGGM bound to it whose classifiers (given
    ready-made, seeded) have dropout 0.5, on EVAL_N samples."""
    from cggm import CGGM
    from cggm.data.base import MultimodalDataset
    from cggm.models.classifiers import VectorClassifier
    from cggm.models.factory import build_model
    from cggm.types import Task

    g = torch.Generator().manual_seed(0)
    if kind == "classification":
        task, target = Task("classification", 3), torch.randint(0, 3, (EVAL_N,), generator=g)
    else:
        task, target = Task("regression", 1), torch.randn(EVAL_N, 1, generator=g)
    inputs = {"a": torch.randn(EVAL_N, 6, generator=g), "b": torch.randn(EVAL_N, 4, generator=g)}
    data = MultimodalDataset(inputs, target)
    torch.manual_seed(1)
    model = build_model("mlp", {"a": (6,), "b": (4,)}, task, feature_dim=8, hidden=16, head_hidden=16)
    out = task.num_outputs
    clfs = [VectorClassifier(8, 16, out, dropout=0.5) for _ in range(2)]
    for clf in clfs:  # larger weights: dropout then changes predictions
        with torch.no_grad():
            for p in clf.parameters():
                p.mul_(3)
    method = CGGM(classifiers=clfs).bind(model, task, ("a", "b"))
    return model, method, data, task


def clf_reference(model, method, data, task) -> tuple[dict[str, float], dict[str, float]]:
    """Each classifier's metric on the whole split, from copies in eval mode, as a per-sample mean
    in numpy (classification: accuracy; regression: -MAE); and, to show a short last batch matters,
    the mean of the batches' means (batches of 8)."""
    model, clfs = copy.deepcopy(model).eval(), copy.deepcopy(method.classifiers).eval()
    with torch.no_grad():
        features = model(data.inputs, {}).features
        y = data.target.double().numpy().reshape(EVAL_N, -1)[:, 0]
        per_sample = {}
        for m, clf, h in zip(("a", "b"), clfs, features):
            pred = clf(h).double().numpy()
            if task.kind == "classification":
                per_sample[m] = (pred.argmax(1) == y).astype(float)
            else:
                per_sample[m] = -np.abs(pred[:, 0] - y)
    whole = {m: float(v.mean()) for m, v in per_sample.items()}
    by_batch = {m: float(np.mean([v[i:i + 8].mean() for i in range(0, EVAL_N, 8)])) for m, v in per_sample.items()}
    return whole, by_batch


def evaluate_clf(kind: str, batch_size: int = 8) -> dict[str, float]:
    from cggm.training.evaluation import evaluate

    model, method, data, task = eval_setup(kind)
    metrics = evaluate(model, method, data, task, "cpu", batch_size=batch_size)
    return {k: v for k, v in metrics.items() if k.startswith("clf/")}


# -- DDP: SGD classifiers, one process against two --------------------------------------------------
GLOBAL_BATCH, STEPS = 16, 3


def train_sgd_classifiers(batch_size: int, lr: float = 0.5) -> dict[str, torch.Tensor]:
    """CGGM with SGD classifiers (as the BraTS preset) trained STEPS steps on GLOBAL_BATCH samples per
    step; the classifiers' weights after them."""
    from cggm import CGGM
    from cggm.data import load_dataset
    from cggm.models.factory import build_model
    from cggm.training import TrainConfig, Trainer, seed_everything

    data = load_dataset("synthetic", dim=8, n_train=STEPS * GLOBAL_BATCH, n_val=16, n_test=16)
    seed_everything(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    method = CGGM(classifier_optimizer="sgd", classifier_lr=lr, classifier_momentum=0.0)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, progress=False, seed=0)
    Trainer(model, method, data, cfg).fit()
    assert method.global_step == STEPS
    return {k: v.detach().clone() for k, v in method.classifiers.state_dict().items()}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {"clf": {kind: evaluate_clf(kind) for kind in KINDS},
               "sgd": train_sgd_classifiers(GLOBAL_BATCH // world)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
