"""One evaluation path (engine, removal diagnostic, reports) honouring a split's own protocol, and
the task's headline metric with its direction per task kind."""

import pytest
import torch

from cggm.data import load_dataset
from cggm.data.base import DataSplits
from cggm.methods import build_method
from cggm.models.factory import build_model
from cggm.report import HEADLINE, evaluate_with, removal_drops
from cggm.training import TrainConfig, Trainer
from cggm.types import Task


class OwnProtocol(torch.utils.data.Dataset):
    """A split with its own protocol (as BraTS scores volumes): its own metric, which returns a fixed,
    hand-set result, and its own batches (one known batch of ones); records the inputs the method's
    evaluation saw (after the evaluation's transform)."""

    def __init__(self, base):
        self.base, self.calls = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]

    def __getattr__(self, name):
        return getattr(self.__dict__["base"], name)

    def eval_batches(self, batch_size):
        yield {m: torch.ones(2, *s) for m, s in self.base.input_shapes.items()}, {}, torch.zeros(2, dtype=torch.long)

    def eval_metric(self):
        own = self

        class Fixed:
            def reset(self):
                return self

            def update(self, prediction, target, loss=None):
                pass

            def compute(self):
                untouched = all(bool((x == 1).all()) for x in own.calls[-1].values())
                return {"loss": 0.25, "accuracy": 0.75 if untouched else 0.5}

        return Fixed()


@pytest.fixture()
def setup():
    data = load_dataset("synthetic", dim=4, n_train=32, n_val=16, n_test=16)
    own = OwnProtocol(data.test)
    data = DataSplits(data.name, data.task, data.train, data.val, own)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=4, hidden=8, head_hidden=8)
    method = build_method("joint").bind(model, data.task, data.modalities)
    prepare = method.prepare_eval

    def spy(inputs, masks):
        if next(iter(inputs.values())).shape[0] == 2:  # the own split's batch
            own.calls.append(dict(inputs))
        return prepare(inputs, masks)

    method.prepare_eval = spy
    return data, own, model, method


def test_evaluate_with_uses_a_splits_own_protocol(setup):
    data, own, model, method = setup
    assert evaluate_with(model, method, data) == {"loss": 0.25, "accuracy": 0.75}
    assert len(own.calls) == 1 and all(bool((x == 1).all()) for x in own.calls[0].values())


def test_the_removal_diagnostic_passes_its_replacement_to_the_splits_protocol(setup):
    data, own, model, method = setup
    full, drops = removal_drops(model, method, data)
    assert full == 0.75 and drops == {m: pytest.approx(0.25) for m in data.modalities}
    first = data.modalities[0]
    replaced = own.calls[1]
    mean = data.train.inputs[first].float().mean(0)
    torch.testing.assert_close(replaced[first], mean.expand(2, *mean.shape))  # the training mean, every sample
    for m in data.modalities[1:]:
        assert torch.equal(replaced[m], torch.ones_like(replaced[m]))  # the others untouched


@pytest.mark.parametrize("kind,outputs,name,higher", [("classification", 3, "accuracy", True),
                                                       ("regression", 1, "mae", False),
                                                       ("segmentation", 3, "dice_mean", True)])
def test_headline_and_direction_per_task_kind(kind, outputs, name, higher):
    task = Task(kind, outputs)
    assert (task.headline.name, task.headline.higher_is_better) == (name, higher)
    assert task.headline.mode == ("max" if higher else "min")
    assert HEADLINE[kind] == (name, "max" if higher else "min")
    assert task.higher_is_better("loss") is False
    assert task.higher_is_better(name) is higher


@pytest.mark.parametrize("metric,mode", [(None, "min"), ("mae", "min"), ("loss", "min"), ("corr", "max"),
                                         ("acc7", "max"), ("f1_nonzero", "max")])
def test_the_trainer_selects_by_the_tasks_direction(metric, mode):
    from cggm.data.base import MultimodalDataset

    g = torch.Generator().manual_seed(0)
    split = lambda n: MultimodalDataset({"a": torch.randn(n, 3, generator=g), "b": torch.randn(n, 2, generator=g)},  # noqa: E731
                                        torch.randn(n, 1, generator=g))
    data = DataSplits("toy", Task("regression", 1), split(8), split(8), split(8))
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=4, hidden=8, head_hidden=8)
    trainer = Trainer(model, build_method("joint"), data, TrainConfig(epochs=1, batch_size=4, progress=False,
                                                                       select_metric=metric))
    assert (trainer.select_name, trainer.select_mode) == (metric or "mae", mode)
