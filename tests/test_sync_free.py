"""The CGGM step makes no host synchronisation (.item(), float(), bool(), .cpu(), .tolist(), ...)."""

import sys

import pytest
import torch

from cggm import CGGM, Task, build_model

FORBIDDEN = ["item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__", "__index__"]


@pytest.mark.parametrize("options", [
    {}, {"scale_on": "gradient"}, {"rule": "paper"}, {"direction": "weight"}, {"direction": "off", "lam": 0.0},
])
def test_cggm_step_has_no_host_sync(options, monkeypatch):
    task = Task("classification", 3)
    model = build_model("mlp", {"a": (5,), "b": (6,), "c": (4,)}, task)
    opt = torch.optim.Adam(model.parameters())
    method = CGGM(**options).bind(model, task, optimizer=opt)
    x = {"a": torch.randn(8, 5), "b": torch.randn(8, 6), "c": torch.randn(8, 4)}
    y = torch.randint(0, 3, (8,))

    def step():
        out = model(x)
        loss = method.loss(out, y, task.loss(out.prediction, y))
        opt.zero_grad(set_to_none=True)
        method.backward(loss)
        method.step(opt)

    step()  # the first step builds the classifiers (may use the host)
    calls = []
    for name in FORBIDDEN:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            # torch's (non-capturable) optimizers keep their step counter on the host, and read it
            # there; that is not a device synchronisation, so calls from torch.optim are allowed
            caller = sys._getframe(1).f_code.co_filename
            if "torch/optim" not in caller.replace("\\", "/"):
                calls.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for _ in range(3):
        step()
    monkeypatch.undo()
    assert calls == [], f"host synchronisation in the CGGM step: {sorted(set(calls))}"
