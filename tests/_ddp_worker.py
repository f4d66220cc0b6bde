"""Worker for tests/test_distributed.py: trains CGGM and joint on a small synthetic set, 50 steps,
in whatever process group is set up, and returns what the test compares."""

from __future__ import annotations

import os

import torch

STEPS_PER_EPOCH, EPOCHS, GLOBAL_BATCH = 25, 2, 16


def train_all(batch_size: int, output_root: str | None = None, names=("cggm", "joint")) -> dict:
    from cggm.data import load_dataset
    from cggm.methods import UnsupportedSettingError, build_method
    from cggm.models.factory import build_model
    from cggm.training import TrainConfig, Trainer, seed_everything

    data = load_dataset("synthetic", dim=8, n_train=STEPS_PER_EPOCH * GLOBAL_BATCH, n_val=48, n_test=32)
    out = {}
    for name in names:
        seed_everything(0)
        model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
        method = build_method(name)
        if name not in ("cggm", "joint"):  # the other methods: replicas must agree (or DDP is refused)
            try:
                result = Trainer(model, method, data, TrainConfig(epochs=EPOCHS, batch_size=batch_size,
                                                                  progress=False, seed=0)).fit()
            except UnsupportedSettingError as err:
                out[name] = {"refused": str(err)}
                continue
            out[name] = {"model": dict(result.extra["final_weights"]), "steps": _final_steps(result),
                         "method": _module_tensors(result.extra["final_method"])}
            continue
        cfg = TrainConfig(epochs=EPOCHS, batch_size=batch_size, progress=False, seed=0)
        # each rank gets its own output folder, so the test sees which ranks wrote files
        out_dir = None if output_root is None else os.path.join(output_root, f"{name}-rank{dist_rank()}")
        result = Trainer(model, method, data, cfg, output_dir=out_dir).fit()
        out[name] = {
            "model": {k: v.clone() for k, v in result.extra["final_weights"].items()},
            "method": _module_tensors(result.extra["final_method"]),
            "steps": _final_steps(result),
            "records": result.records,
            "history": result.history,
        }
    return out


def _final_steps(result) -> int:
    """Optimizer steps at the end of training (after fit the method holds the selected epoch's state)."""
    return int(result.extra["final_method"]["global_step"])


def _module_tensors(state, prefix="") -> dict:
    """The tensors of the method's state at the end of training, flattened by path (its modules' weights,
    optimizer moments and statistics)."""
    out = {}
    if isinstance(state, torch.Tensor):
        out[prefix] = state.detach().clone()
    elif isinstance(state, dict):
        for k, v in state.items():
            out.update(_module_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_module_tensors(v, f"{prefix}[{i}]"))
    return out


def dist_rank() -> int:
    from cggm import distributed

    return distributed.rank()


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from cggm.methods import list_methods

        results = train_all(GLOBAL_BATCH // world, out_dir)
        results.update(train_all(GLOBAL_BATCH // world, None, [m for m in list_methods() if m not in results]))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# -- sharded evaluation -------------------------------------------------------------------------------
EVAL_N = 37  # odd: the shards of 2 ranks differ in size, and no sample may be padded in


def evaluate_all() -> dict:
    """Evaluate fixed models (classification, regression) on an odd-sized split with
    cggm.training.evaluation.evaluate in whatever process group is set up; also count the samples
    this process forwarded."""
    from cggm.data.base import MultimodalDataset
    from cggm.methods import build_method
    from cggm.models.factory import build_model
    from cggm.training.evaluation import evaluate
    from cggm.types import Task

    g = torch.Generator().manual_seed(0)
    out = {}
    tasks = {"classification": (Task("classification", 3), torch.randint(0, 3, (EVAL_N,), generator=g)),
             "regression": (Task("regression", 1), (torch.randint(-3, 4, (EVAL_N, 1), generator=g) * 0.7))}
    for kind, (task, target) in tasks.items():
        inputs = {"a": torch.randn(EVAL_N, 6, generator=g), "b": torch.randn(EVAL_N, 4, generator=g)}
        data = MultimodalDataset(inputs, target)
        torch.manual_seed(1)
        model = build_model("mlp", {"a": (6,), "b": (4,)}, task, feature_dim=8, hidden=16, head_hidden=16)
        seen = []
        model.register_forward_hook(lambda _m, args, _o, seen=seen: seen.append(int(next(iter(args[0].values())).shape[0])))
        method = build_method("joint").bind(model, task, ("a", "b"))
        out[kind] = {"metrics": evaluate(model, method, data, task, "cpu", batch_size=5), "seen": sum(seen)}
    return out


def eval_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(evaluate_all(), os.path.join(out_dir, f"eval{rank}.pt"))
    finally:
        dist.destroy_process_group()
