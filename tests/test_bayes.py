"""The synthetic benchmark's Bayes-optimal ceiling (cggm.data.synthetic), checked without its closed form.

* Monte Carlo: p(x_m | y) estimated by sampling the generator's latent variables (the strong
  modality's corruption, the weak modalities' signs) as the module docstring describes them, and
  averaging Gaussian densities; normalised over y, it must match the closed-form posterior.
* Calibration: on a large fresh sample, the true posterior's mean top probability is the Bayes
  rule's accuracy, and E[p_y(x)] = E[sum_k p_k(x)^2]; neither holds for a wrong posterior.
* Optimality: the Bayes rule is the best classifier, so a well-trained MLP on a large sample, and
  models trained with registered methods, must not beat it beyond paired sampling error; and the
  MLP comes within a few points of it (the ceiling is not vacuous).
* A limit in closed form: with a huge imbalance the strong modality alone is right on its clean
  samples and by chance on the corrupted ones: (1 - rho) + rho / K.
"""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cggm.data import DataError, load_dataset


def mc_posterior(gen, x: dict, modalities, draws: int = 4000, seed: int = 0) -> torch.Tensor:
    """p(y | x) by Monte Carlo over the latent code/sign, Gaussian densities from torch.distributions."""
    g = torch.Generator().manual_seed(seed)
    k = gen.num_classes
    n = next(iter(x.values())).shape[0]
    logp = torch.zeros(n, k, dtype=torch.float64)
    for m in modalities:
        i = gen.names.index(m)
        mu = gen.means[i].double()
        xm = x[m].double()
        for y in range(k):
            code = torch.full((draws,), y)
            flip = torch.rand(draws, generator=g) < gen.corruption[i]
            code[flip] = torch.randint(0, k, (int(flip.sum()),), generator=g)
            sign = (torch.randint(0, 2, (draws, 1), generator=g) * 2 - 1) if gen.signed[i] else torch.ones(draws, 1)
            centres = mu[code] * sign.double()                                    # [draws, d]
            logphi = torch.distributions.Normal(centres[None], 1.0).log_prob(xm[:, None]).sum(-1)  # [n, draws]
            logp[:, y] += torch.logsumexp(logphi, 1) - math.log(draws)
    return torch.softmax(logp, 1)


CASES = [dict(), dict(imbalance=0.0), dict(num_modalities=3, num_classes=5, dim=6, imbalance=1.0,
                                           strong_corruption=0.4, seed=2)]


@pytest.mark.parametrize("options", CASES)
def test_closed_form_posterior_matches_monte_carlo(options):
    data = load_dataset("synthetic", **options)
    x = {m: v[:40] for m, v in data.test.inputs.items()}
    for mods in [[m] for m in data.modalities] + [list(data.modalities)]:
        exact = data.posterior(x, mods).double()
        mc = mc_posterior(data.generator, x, mods)
        assert (exact.sum(1) - 1).abs().max() < 1e-9
        # 4000 draws per class: the estimate's error is about 1%; a wrong mixture is off by >10%
        assert (exact - mc).abs().max() < 0.04, (mods, (exact - mc).abs().max())


@pytest.mark.parametrize("options", CASES[:2])
def test_posterior_is_calibrated_on_fresh_samples(options):
    data = load_dataset("synthetic", **options)
    big = data.sample(60000, seed=1)
    for mods in [[m] for m in data.modalities] + [None]:
        p = data.posterior(big.inputs, mods)
        hit = (p.argmax(1) == big.target).double()
        se = float(hit.std()) / math.sqrt(len(hit))
        assert abs(float(hit.mean()) - float(p.max(1).values.mean())) < 4 * se + 1e-3, mods
        py = p.gather(1, big.target[:, None]).squeeze(1)
        diff = py - (p * p).sum(1)
        assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff)) + 1e-3, mods


def test_strong_ceiling_in_the_large_imbalance_limit():
    data = load_dataset("synthetic", imbalance=40.0, strong_corruption=0.3, num_classes=5)
    acc = data.bayes_optimal(data.sample(100000, seed=3))["strong"]
    expected = 0.7 + 0.3 / 5
    assert abs(acc - expected) < 4 * math.sqrt(expected * (1 - expected) / 100000)


def _paired_not_beaten(bayes_hit: torch.Tensor, model_hit: torch.Tensor, what: str) -> None:
    """The model beats the Bayes rule on b samples and loses on c: c - b >= -3 sqrt(b + c)."""
    b = int((model_hit & ~bayes_hit).sum())
    c = int((~model_hit & bayes_hit).sum())
    assert c - b >= -3 * math.sqrt(b + c + 1), (what, b, c)


def _mlp_hits(train, test, modalities, seed=0, epochs=12):
    torch.manual_seed(seed)
    xtr = torch.cat([train.inputs[m] for m in modalities], 1)
    xte = torch.cat([test.inputs[m] for m in modalities], 1)
    net = nn.Sequential(nn.Linear(xtr.shape[1], 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr)).split(256):
            loss = F.cross_entropy(net(xtr[idx]), train.target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return net(xte).argmax(1) == test.target


@pytest.mark.parametrize("imbalance", [0.0, 3.0])
def test_no_trained_model_beats_the_bayes_rule(imbalance):
    torch.set_num_threads(1)
    data = load_dataset("synthetic", imbalance=imbalance)
    train, test = data.sample(30000, seed=10), data.sample(20000, seed=11)
    for mods in (["strong"], ["weak"], ["strong", "weak"]):
        bayes = data.posterior(test.inputs, mods).argmax(1) == test.target
        model = _mlp_hits(train, test, mods)
        _paired_not_beaten(bayes, model, mods)
        # and the ceiling is not vacuous: a well-trained model gets close to it
        assert float(bayes.double().mean() - model.double().mean()) < 0.03, mods


def test_registered_methods_do_not_beat_the_bayes_rule():
    from cggm.methods import build_method
    from cggm.models import build_model
    from cggm.training import TrainConfig, Trainer, seed_everything

    torch.set_num_threads(1)
    data = load_dataset("synthetic", imbalance=1.0)
    bayes = data.posterior(data.test.inputs).argmax(1) == data.test.target
    for name in ("joint", "cggm", "mmpareto"):
        seed_everything(0)
        model = build_model("mlp", data.input_shapes, data.task)
        trainer = Trainer(model, build_method(name), data, TrainConfig(epochs=6, batch_size=64, seed=0, progress=False))
        trainer.fit()
        model.eval()
        with torch.no_grad():
            inputs, masks = trainer.method.prepare_eval(dict(data.test.inputs), {})
            pred = trainer.method.eval_prediction(model(inputs, masks)).argmax(1)
        _paired_not_beaten(bayes, pred == data.test.target, name)


def test_bayes_optimal_reports_every_modality_and_refuses_bad_input():
    data = load_dataset("synthetic", num_modalities=3)
    acc = data.bayes_optimal("val")
    assert set(acc) == {"strong", "weak1", "weak2", "fused"}
    assert acc["fused"] >= max(acc["strong"], acc["weak1"]) - 0.02
    with pytest.raises(DataError, match="split"):
        data.bayes_optimal("validation")
    with pytest.raises(DataError, match="needs inputs"):
        data.posterior({"strong": data.test.inputs["strong"]}, ["strong", "weak1"])
    with pytest.raises(DataError, match="shape"):
        data.posterior({"strong": torch.zeros(3, 5)}, ["strong"])
    with pytest.raises(DataError, match="n >= 1"):
        data.sample(0)


def test_posterior_follows_the_input_device():
    data = load_dataset("synthetic")
    x = {m: v[:5].to("meta") for m, v in data.test.inputs.items()}
    assert data.posterior(x).device.type == "meta"
