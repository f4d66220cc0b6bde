"""Fingerprint what every registered method computes on the engine's small test setup, to show
that a refactoring kept behaviour (bitwise).

    python scripts/behaviour_snapshot.py --out before.json          # on the old code
    python scripts/behaviour_snapshot.py --compare before.json      # on the new code

For each method and M in (2, 3) (where the method supports M), a 2-epoch ``Trainer`` run on 64
synthetic samples, one thread, fixed seed, SGD and Adam: the SHA-256 of the final and selected
weights, the validation and test metrics, the per-step records and the method's state. ``--compare``
prints, per run, ``same`` or which fingerprints differ (and by how much for numbers), and exits 1
if any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import warnings

import torch


def _digest(obj) -> str:
    """SHA-256 of the tensors (values and shapes) in a nested structure, in a fixed order."""
    h = hashlib.sha256()

    def walk(x, key=""):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k], f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{key}[{i}]")
        elif isinstance(x, torch.Generator):
            walk(x.get_state(), key)
        elif isinstance(x, (int, float, str, bool)) or x is None:
            h.update(f"{key}={x!r}".encode())
        else:  # objects with a state_dict
            sd = getattr(x, "state_dict", None)
            if callable(sd):
                walk(sd(), key)
            else:
                buf = io.BytesIO()
                torch.save(x, buf)
                h.update(buf.getvalue())

    walk(obj)
    return h.hexdigest()[:16]


def _tensors_only(state):
    """The method's state with only tensors and numbers (names of the keys may change between
    designs, so the digest is over the sorted leaves' values, not the keys)."""
    leaves = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            leaves.append(x.detach().cpu().float().reshape(-1))
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    if not leaves:
        return []
    flat = torch.cat(leaves)
    return sorted(round(float(v), 12) for v in flat)


def run(name: str, M: int, optimizer: str) -> dict:
    from cggm.data import load_dataset
    from cggm.methods import UnsupportedSettingError, build_method
    from cggm.models import build_model
    from cggm.training.trainer import TrainConfig, Trainer

    data = load_dataset("synthetic", num_modalities=M, n_train=64, n_val=32, n_test=32)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    method = build_method(name)
    try:
        trainer = Trainer(model, method, data, TrainConfig(epochs=2, batch_size=16, progress=False, seed=0,
                                                          optimizer=optimizer, lr=1e-2))
    except UnsupportedSettingError as err:
        return {"unsupported": str(err).split(":")[0]}
    result = trainer.fit()
    final = result.extra["final_weights"]
    return {
        "final_weights": _digest(final),
        "selected_weights": _digest(model.state_dict()),
        "best_epoch": result.best_epoch,
        "val": {k: v for k, v in sorted(result.val.items())},
        "test": {k: v for k, v in sorted(result.test.items())},
        "records": {k: _digest(torch.tensor(v)) for k, v in sorted(result.records.items())},
        "history_loss": [h["train_loss"] for h in result.history],
        # the state at the end of training (the engine then loads the selected epoch's for the test)
        "method_state_values": _digest(torch.tensor(_tensors_only(result.extra.get("final_method",
                                                                                    method.state_dict())))),
    }


def snapshot(methods: list[str] | None) -> dict:
    from cggm.methods import list_methods

    torch.set_num_threads(1)
    out = {}
    for name in methods or list_methods():
        for M in (2, 3):
            for opt in ("adam", "sgd"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[f"{name}/M{M}/{opt}"] = run(name, M, opt)
                print(f"{name} M={M} {opt}: done", file=sys.stderr, flush=True)
    return out


def compare(before: dict, after: dict) -> int:
    bad = new = 0
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            print(f"{key}: {'new' if a is None else 'missing now'}")
            bad += a is not None
            new += a is None
            continue
        diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if not diffs:
            print(f"{key}: same")
            continue
        bad += 1
        detail = []
        for k in diffs:
            if k in ("val", "test") and isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                d = {m: (a[k].get(m), b[k].get(m)) for m in set(a[k]) | set(b[k]) if a[k].get(m) != b[k].get(m)}
                detail.append(f"{k} {d}")
            else:
                detail.append(k)
        print(f"{key}: DIFFERS in {'; '.join(detail)}")
    print(f"{len(set(before) | set(after)) - bad - new} same, {bad} differ, {new} new")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the snapshot here (JSON)")
    p.add_argument("--compare", help="compare with this earlier snapshot (JSON)")
    p.add_argument("--methods", nargs="*", help="only these methods")
    args = p.parse_args()
    snap = snapshot(args.methods)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(snap, f, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        if args.methods:
            before = {k: v for k, v in before.items() if k.split("/")[0] in args.methods}
        return compare(before, snap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
