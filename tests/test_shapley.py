"""Each modality's Shapley contribution (cggm.diagnostics.shapley): the axioms, a hand-computed
3-player game, and a brute-force permutation average on coalition values computed here with numpy.

Expected values never come from the code under test: the hand game is worked out in the comments,
the brute force averages marginal contributions over all M! orders (a different algorithm from the
subset formula) on values computed from the data and the model's weights directly."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from cggm import ModelOutput, Task, build_model
from cggm.data import load_dataset
from cggm.data.base import DataSplits, MultimodalDataset
from cggm.diagnostics import shapley_contributions, shapley_values
from cggm.diagnostics.shapley import MASKINGS
from cggm.methods import build_method

CLS2 = Task("classification", num_outputs=2)


class ScoreModel(nn.Module):
    """``z = sum_m w_m * x_m + bias`` over scalar inputs ``x_m`` ([B, 1]); the feature of m is
    ``w_m * x_m``. Classification: logits ``[-z, z]`` (a tie, z = 0, predicts class 0: argmax takes
    the first maximum). Regression: the prediction is ``z``."""

    def __init__(self, weights: dict[str, float], bias: float = 0.0, kind: str = "classification"):
        super().__init__()
        self.modalities = tuple(weights)
        self.w = nn.Parameter(torch.tensor([weights[m] for m in self.modalities], dtype=torch.float64))
        self.bias, self.kind = bias, kind

    def encode(self, inputs, masks=None):
        return [self.w[i] * inputs[m].double() for i, m in enumerate(self.modalities)]

    def predict(self, features, masks=None):
        z = torch.stack(features).sum(0) + self.bias  # [B, 1]
        return torch.cat([-z, z], dim=1) if self.kind == "classification" else z

    def forward(self, inputs, masks=None):
        features = self.encode(inputs, masks)
        return ModelOutput(self.predict(features), features)


def _split(columns: dict[str, list[float]], target) -> MultimodalDataset:
    return MultimodalDataset({m: torch.tensor(v, dtype=torch.float32).reshape(-1, 1) for m, v in columns.items()},
                             torch.as_tensor(target))


# -- the hand-computed 3-player game ------------------------------------------------------------------
# Votes s_m in {-1, +1}, weights a = 3, b = 2, c = 2, four samples (y = 1, 1, 0, 1):
#   sample 1: (+1, -1, -1)   sample 2: (-1, +1, +1)   sample 3: (+1, +1, -1)   sample 4: (+1, +1, +1)
# An absent modality votes 0; predicted class 1 iff the weighted sum of present votes is > 0.
# Correct samples per coalition (z per sample in brackets):
#   {}      [0, 0, 0, 0]      -> only sample 3 (y = 0)            v = 1/4
#   {a}     [3, -3, 3, 3]     -> 1, 4                             v = 2/4
#   {b}     [-2, 2, 2, 2]     -> 2, 4                             v = 2/4
#   {c}     [-2, 2, -2, 2]    -> 2, 3, 4                          v = 3/4
#   {a,b}   [1, -1, 5, 5]     -> 1, 4                             v = 2/4
#   {a,c}   [1, -1, 1, 5]     -> 1, 4                             v = 2/4
#   {b,c}   [-4, 4, 0, 4]     -> 2, 3, 4                          v = 3/4
#   {a,b,c} [-1, 1, 3, 7]     -> 2, 4                             v = 2/4
# Shapley weights for M = 3: |S| = 0 -> 1/3, |S| = 1 -> 1/6, |S| = 2 -> 1/3. In quarters:
#   phi_a = 1/3 (2-1) + 1/6 (2-2) + 1/6 (2-3) + 1/3 (2-3) = -1/6  -> -1/24
#   phi_b = 1/3 (2-1) + 1/6 (2-2) + 1/6 (3-3) + 1/3 (2-2) =  1/3  ->  2/24
#   phi_c = 1/3 (3-1) + 1/6 (2-2) + 1/6 (3-2) + 1/3 (2-2) =  5/6  ->  5/24
# and phi_a + phi_b + phi_c = 6/24 = v(abc) - v({}) = 2/4 - 1/4.
HAND_VOTES = {"a": [1, -1, 1, 1], "b": [-1, 1, 1, 1], "c": [-1, 1, -1, 1]}
HAND_TARGET = [1, 1, 0, 1]
HAND_VALUES = {"": 1, "a": 2, "b": 2, "c": 3, "ab": 2, "ac": 2, "bc": 3, "abc": 2}  # quarters
HAND_PHI = {"a": -1 / 24, "b": 2 / 24, "c": 5 / 24}


@pytest.mark.parametrize("masking,fill", [("features", None), ("zero", None), ("mean", "zeros")])
def test_hand_computed_three_player_game(masking, fill):
    data = _split(HAND_VOTES, HAND_TARGET)
    model = ScoreModel({"a": 3.0, "b": 2.0, "c": 2.0})
    fill = {m: torch.zeros(1, 1) for m in "abc"} if fill == "zeros" else None
    res = shapley_contributions(model, None, data, CLS2, masking=masking, fill=fill)
    assert {"".join(sorted(s)): round(v * 4, 9) for s, v in res.values.items()} == HAND_VALUES
    assert res.phi == pytest.approx(HAND_PHI, abs=1e-12)
    assert res.v_empty == 0.25 and res.v_full == 0.5
    assert res.to_dict()["values"] == {"{}": 0.25, "a": 0.5, "b": 0.5, "c": 0.75, "a+b": 0.5, "a+c": 0.5,
                                       "b+c": 0.75, "a+b+c": 0.5}


def test_shapley_values_of_a_table_matches_the_hand_game():
    values = {frozenset(k): v / 4 for k, v in HAND_VALUES.items()}
    assert shapley_values(values, "abc") == pytest.approx(HAND_PHI, abs=1e-12)
    with pytest.raises(ValueError, match="every coalition"):
        shapley_values({frozenset(): 0.0, frozenset("a"): 1.0}, "ab")


# -- the axioms ---------------------------------------------------------------------------------------
def _random_splits(seed: int, modalities, n: int = (200, 120, 60), task=CLS2, target=None) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    splits = []
    for size in n:
        x = {m: torch.randn(size, 1, generator=g) + 0.3 * i for i, m in enumerate(modalities)}
        y = (sum(x.values()) + 0.5 * torch.randn(size, 1, generator=g) > 0.5).long().squeeze(1)
        splits.append(MultimodalDataset(x, y if target is None else target(x, g)))
    return DataSplits("random", task, *splits)


def _interaction_model():
    # a non-additive game: the threshold (bias) makes a modality's effect depend on the others
    return ScoreModel({"a": 1.5, "b": -0.7, "c": 0.4, "d": 1.1}, bias=-0.6)


@pytest.mark.parametrize("masking", ["mean", "features", "zero"])
def test_efficiency(masking):
    data = _random_splits(0, "abcd")
    res = shapley_contributions(_interaction_model(), None, data, masking=masking)
    assert len(res.values) == 16 and res.split == "val"
    assert sum(res.phi.values()) == pytest.approx(res.v_full - res.v_empty, abs=1e-12)
    assert len({round(v, 9) for v in res.values.values()}) > 4  # the game is not trivial


def test_efficiency_of_a_built_in_model_through_a_method():
    torch.manual_seed(0)
    data = load_dataset("synthetic", num_modalities=3, n_train=96, n_val=64, n_test=32)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    method = build_method("cggm").bind(model, data.task)
    for masking in ("mean", "features"):
        res = shapley_contributions(model, method, data, masking=masking, batch_size=24)
        assert sum(res.phi.values()) == pytest.approx(res.v_full - res.v_empty, abs=1e-9)
    # "mean" masking of all modalities but one is the removal diagnostic's replacement
    from cggm.report import evaluate_with

    mean = {m: data.train.inputs[m].float().mean(0, keepdim=True) for m in ("weak1", "weak2")}
    direct = evaluate_with(model, method, data, split="val", fill=mean)["accuracy"]
    res = shapley_contributions(model, method, data, batch_size=24)
    assert res.values[frozenset({"strong"})] == direct


def test_symmetry():
    # b and c carry the same input and weight: interchangeable in every coalition
    def duplicate(split):
        x = dict(split.inputs)
        x["c"] = x["b"].clone()
        return MultimodalDataset(x, split.target)

    base = _random_splits(1, "abcd")
    data = DataSplits("sym", CLS2, *(duplicate(s) for s in (base.train, base.val, base.test)))
    model = ScoreModel({"a": 1.5, "b": 0.8, "c": 0.8, "d": -0.5}, bias=-0.4)
    for masking in ("mean", "features"):
        res = shapley_contributions(model, None, data, masking=masking)
        assert res.phi["b"] == pytest.approx(res.phi["c"], abs=1e-12)
        assert res.phi["b"] != pytest.approx(res.phi["a"], abs=1e-3)
        assert res.phi["b"] > 0.01  # a real contribution, not two zeros


def test_null_player():
    # the fused head reads nothing of weak2's feature: its contribution is 0, the others' are not
    torch.manual_seed(0)
    data = load_dataset("synthetic", num_modalities=3, n_train=96, n_val=64, n_test=32)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    block = slice(16, 24)  # ConcatFusion: strong, weak1, weak2, 8 features each
    assert model.modalities == ("strong", "weak1", "weak2") and model.head.proj.in_features == 24
    with torch.no_grad():
        model.head.proj.weight[:, block] = 0.0
    for masking in ("mean", "features"):
        res = shapley_contributions(model, None, data, masking=masking)
        assert res.phi["weak2"] == pytest.approx(0.0, abs=1e-12)
        assert abs(res.phi["strong"]) + abs(res.phi["weak1"]) > 0.01


# -- general M: brute force over orders on values computed here ---------------------------------------
def test_regression_matches_a_permutation_average_of_independent_values():
    # y = x . true + noise; the model's weights differ from the truth, so coalitions interact through |.|
    def target(x, g):
        return (1.0 * x["a"] - 2.0 * x["b"] + 0.5 * x["c"] + 0.3 * torch.randn(x["a"].shape, generator=g)).squeeze(1)

    data = _random_splits(2, "abc", task=Task("regression", 1), target=target)
    weights = {"a": 0.8, "b": -1.5, "c": 1.2}
    res = shapley_contributions(ScoreModel(weights, bias=0.1, kind="regression"), None, data, split="test")

    x = {m: data.test.inputs[m].double().numpy()[:, 0] for m in "abc"}
    mean = {m: data.train.inputs[m].double().numpy()[:, 0].mean() for m in "abc"}
    y = data.test.target.double().numpy()

    def mae(coalition):
        z = 0.1 + sum(weights[m] * (x[m] if m in coalition else mean[m]) for m in "abc")
        return float(np.abs(z - y).mean())

    for k in range(4):
        for s in itertools.combinations("abc", k):
            assert res.values[frozenset(s)] == pytest.approx(mae(s), abs=1e-5)
    phi = dict.fromkeys("abc", 0.0)
    for order in itertools.permutations("abc"):
        for i, m in enumerate(order):
            phi[m] += (mae(order[:i]) - mae(order[: i + 1])) / math.factorial(3)  # -MAE: lower error is better
    assert res.phi == pytest.approx(phi, abs=1e-5)
    assert not res.higher_is_better and res.metric == "mae"
    assert sum(res.phi.values()) == pytest.approx(res.v_empty - res.v_full, abs=1e-9)


def test_ten_modalities_at_most_and_options_checked():
    many = MultimodalDataset({f"m{i}": torch.zeros(2, 1) for i in range(11)}, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 10 modalities"):
        shapley_contributions(ScoreModel({f"m{i}": 1.0 for i in range(11)}), None, many, CLS2)
    data = _split(HAND_VOTES, HAND_TARGET)
    with pytest.raises(ValueError, match="masking must be one of"):
        shapley_contributions(ScoreModel({"a": 1.0, "b": 1.0, "c": 1.0}), None, data, CLS2, masking="drop")
    with pytest.raises(ValueError, match="needs task="):
        shapley_contributions(ScoreModel({"a": 1.0, "b": 1.0, "c": 1.0}), None, data)

    class ForwardOnly(nn.Module):
        modalities = ("a", "b", "c")

        def __init__(self):
            super().__init__()
            self.inner = ScoreModel({"a": 1.0, "b": 1.0, "c": 1.0})

        def forward(self, inputs, masks=None):
            return self.inner(inputs, masks)

    with pytest.raises(TypeError, match="model.encode"):
        shapley_contributions(ForwardOnly(), None, data, CLS2, masking="features")
    res = shapley_contributions(ForwardOnly(), None, data, CLS2, masking="zero")  # input masking: forward only
    assert sum(res.phi.values()) == pytest.approx(0.5 - 0.25, abs=1e-12)  # v(abc) = 2/4, v({}) = 1/4 (hand)


def test_mean_masking_of_a_split_that_only_serves_batches():
    # memory-mapped caches offer get_batch only: the training mean is read by batches (7 does not divide 200)
    class BatchesOnly:
        def __init__(self, split):
            self._split = split
            self.modalities = split.modalities

        def __len__(self):
            return len(self._split)

        def get_batch(self, idx):
            return self._split.get_batch(idx)

        def check_task(self, task):
            self._split.check_task(task)

    data = _random_splits(3, "abc")
    served = DataSplits("served", CLS2, BatchesOnly(data.train), data.val, data.test)
    model = ScoreModel({"a": 1.0, "b": -0.6, "c": 0.9}, bias=-0.3)
    fill = {m: data.train.inputs[m].mean(0, keepdim=True) for m in "abc"}  # computed here, whole
    expected = shapley_contributions(model, None, data.val, CLS2, fill=fill)
    res = shapley_contributions(model, None, served, batch_size=7)
    assert res.values == pytest.approx(expected.values, abs=1e-12) and res.phi == pytest.approx(expected.phi, abs=1e-12)
    assert len({round(v, 9) for v in res.values.values()}) > 3


def test_diagnose_shows_the_shapley_contributions(tmp_path, capsys):
    import json

    from cggm.cli import main

    out = tmp_path / "run"
    tiny = ["--set", "dataset.options.n_train=96", "--set", "dataset.options.n_val=40", "--set",
            "dataset.options.n_test=40", "--set", "train.epochs=1", "--set", "train.batch_size=32"]
    assert main(["train", "--preset", "synthetic", "--method", "joint", "--output", str(out), "--quiet", *tiny]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(out), "--json", str(tmp_path / "d.json"), "--shapley-masking", "features"]) == 0
    text = capsys.readouterr().out
    assert "Shapley contribution to val accuracy, masking='features'" in text and "v(empty)" in text
    d = json.loads((tmp_path / "d.json").read_text())["shapley"]
    assert set(d["phi"]) == {"strong", "weak"} and len(d["values"]) == 4 and d["split"] == "val"
    v = d["values"]  # M = 2: phi_strong = 1/2 [v(s) - v({})] + 1/2 [v(s+w) - v(w)]
    assert d["phi"]["strong"] == pytest.approx(0.5 * (v["strong"] - v["{}"]) + 0.5 * (v["strong+weak"] - v["weak"]))
    assert main(["diagnose", str(out), "--json", str(tmp_path / "e.json"), "--shapley-masking", "off"]) == 0
    assert "Shapley" not in capsys.readouterr().out and "shapley" not in json.loads((tmp_path / "e.json").read_text())


def test_bench_report_shows_the_shapley_contributions(tmp_path):
    import csv
    import json

    from cggm.cli import main

    out = tmp_path / "report"
    tiny = ["--set", "dataset.options.n_train=96", "--set", "dataset.options.n_val=40", "--set",
            "dataset.options.n_test=40", "--set", "train.epochs=1", "--set", "train.batch_size=32"]
    assert main(["bench", "--datasets", "synthetic", "--methods", "joint", "--seeds", "2", "--report", str(out),
                 *tiny]) == 0
    runs = json.loads((out / "bench.json").read_text())["datasets"][0]["runs"]
    for r in runs:
        assert set(r["shapley"]) == {"strong", "weak"}
        assert sum(r["shapley"].values()) == pytest.approx(r["shapley_full"] - r["shapley_empty"], abs=1e-9)
    md = (out / "report.md").read_text()
    assert "Shapley contribution of each modality to the fused validation accuracy" in md
    row = next(line for line in md.splitlines() if line.startswith("| joint |") and "φ" not in line
               and line.count("±") == 4)  # φ strong, φ weak, v(none), v(all)
    mean = np.mean([r["shapley"]["strong"] for r in runs])
    assert row.split(" | ")[1].startswith(f"{mean:.3f} ±")
    with (out / "summary.csv").open() as f:
        summary = next(csv.DictReader(f))
    assert float(summary["shapley_weak"]) == pytest.approx(np.mean([r["shapley"]["weak"] for r in runs]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_the_model_to_cuda():
    data = _split(HAND_VOTES, HAND_TARGET)  # on the host; the model on the device
    model = ScoreModel({"a": 3.0, "b": 2.0, "c": 2.0}).to("cuda")
    for masking in MASKINGS:
        fill = {m: torch.zeros(1, 1) for m in "abc"} if masking == "mean" else None
        res = shapley_contributions(model, None, data, CLS2, masking=masking, fill=fill)
        assert res.phi == pytest.approx(HAND_PHI, abs=1e-12)
