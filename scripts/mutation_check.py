"""Mutation check of the trust tests: break the library on purpose, one mutant at a time, in a
copy of the source, and report which test kills each mutant (a surviving mutant is a test gap).

    python scripts/mutation_check.py                 # every mutant (about 1 minute on 2 cores)
    python scripts/mutation_check.py "rho missing"   # the mutants whose name contains a string
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MUT = Path(tempfile.mkdtemp(prefix="cggm-mutants-"))
shutil.copytree(ROOT / "tests", MUT / "tests")
TESTS = ["tests/test_shapley.py", "tests/test_equations.py", "tests/test_trust.py", "tests/test_one_backward.py", "tests/methods",
         "tests/test_engine.py", "tests/test_bayes.py", "tests/test_accumulation.py", "tests/test_official_numerator.py",
         "tests/test_own_loop.py", "tests/test_selected_run.py", "-k", "not 100k"]
MUTANTS = {
 "cml: no stop-gradient on the superset confidence when both levels are wrong": ("cggm/methods/cml.py",
   "(conf[lv + 1] - conf[lv].detach())", "(conf[lv + 1] - conf[lv])"),
 "opm: dominance tanh(relu(rho)) instead of tanh(relu(rho - 1))": ("cggm/methods/opm.py",
   "r = torch.tanh(torch.relu(rho - 1))", "r = torch.tanh(torch.relu(rho))"),
 "lfm: BalanceMM's reversed initialisation as the default": ("cggm/methods/lfm.py",
   'INITS = {"official": 0.95, "bmm": 0.05}', 'INITS = {"official": 0.05, "bmm": 0.05}', ["tests/methods/test_lfm.py"]),
 "lfm: alignment KL(P||R) (Jensen-Shannon) instead of KL(R||P)": ("cggm/methods/lfm.py",
   "(r * (lr - lp)).sum(1)", "(lp.exp() * (lp - lr)).sum(1)", ["tests/methods/test_lfm.py"]),
 "amco: kept features rescaled by 1/(1 + pt) instead of 1/(1 - pt)": ("cggm/methods/amco.py",
   "return 1.0 / (1.0 - pt) if", "return 1.0 / (1.0 + pt) if", ["tests/methods/test_amco.py"]),
 "amco: dependence from per-modality softmaxes instead of one across modalities": ("cggm/methods/amco.py",
   "p = torch.cat([z.float() for z in logits], dim=1).softmax(dim=1)",
   "p = torch.cat([z.float().softmax(1) for z in logits], dim=1) / len(logits)", ["tests/methods/test_amco.py"]),
 "ogm_plus: boost on the dominant modality instead of the weak one": ("cggm/methods/ogm_plus.py",
   "torch.where(ratio < 1,", "torch.where(ratio > 1,", ["tests/methods/test_ogm_plus.py"]),
 "mbsd: weight w not gated by correctness": ("cggm/methods/mbsd.py",
   "torch.where(correct, (ta - tb).abs(), torch.zeros_like(ta))", "(ta - tb).abs()"),
 "Shapley: uniform weights instead of |S|!(M-|S|-1)!/M!": ("cggm/metrics/shapley.py",
   "weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)", "weight = 1 / 2 ** (n - 1)"),
 "Shapley: marginals along one order of the modalities": ("cggm/metrics/shapley.py",
   "        phi[m] = total",
   "        phi[m] = values[frozenset(players[:players.index(m) + 1])] - values[frozenset(players[:players.index(m)])]"),
 "Shapley: v(S) not subtracted": ("cggm/metrics/shapley.py",
   "total += weight * (values[coalition | {m}] - values[coalition])", "total += weight * values[coalition | {m}]"),
 "Shapley: feature masking masks nothing": ("cggm/diagnostics/shapley.py",
   "features = [h if m in self.keep else", "features = [h if True else"),
 "mla: head weight gradient not projected (owm)": ("cggm/methods/mla.py",
   "        return G @ P.t()", "        return G", ["tests/methods/test_mla.py"]),
 "mla: alpha_j without the batch schedule": ("cggm/methods/mla.py",
   "return 0.1 ** (1.0 + min(int(self.batch_index), J) / J)", "return 0.1", ["tests/methods/test_mla.py"]),
 "relearning: re-initialisation weights theta0 by 1 - alpha instead of alpha": ("cggm/methods/relearning.py",
   "p.copy_(a * p0.to(p.device, p.dtype) + (1 - a) * p)", "p.copy_((1 - a) * p0.to(p.device, p.dtype) + a * p)",
   ["tests/methods/test_relearning.py"]),
 "mses: a modality stopped one epoch early (patience - 1)": ("cggm/methods/mses.py",
   "if self.bad_epochs[i] >= self.patience:", "if self.bad_epochs[i] >= self.patience - 1:", ["tests/methods/test_mses.py"]),
 "mses: stopped modality's encoder still trained": ("cggm/methods/mses.py",
   "                    p.requires_grad_(False)\n", "                    pass\n", ["tests/methods/test_mses.py"]),
 "valuation: one copy only above 0.6 instead of 0.4": ("cggm/methods/valuation.py",
   "torch.where(phi > 0.4, 1,", "torch.where(phi > 0.6, 1,", ["tests/methods/test_valuation.py"]),
 "valuation: loss averaged over the originals only, not originals and copies": ("cggm/methods/valuation.py",
   "        return total / n", "        return total / B", ["tests/methods/test_valuation.py"]),
 "di_mml: L_DUC teacher not stop-gradient": ("cggm/methods/di_mml.py",
   "teacher[:, dims].detach().float()", "teacher[:, dims].float()", ["tests/methods/test_di_mml.py"]),
 "di_mml: stage-2 encoders not frozen": ("cggm/methods/di_mml.py",
   "self.model.predict([h.detach() for h in out.features], out.masks)", "self.model.predict(list(out.features), out.masks)",
   ["tests/methods/test_di_mml.py"]),
 "mmcosine: class weights not normalised": ("cggm/methods/mmcosine.py",
   "F.normalize(h, dim=1) @ F.normalize(w, dim=1).t()", "F.normalize(h, dim=1) @ w.t()"),
 "weights for gradients (A1) in the direction term": ("cggm/methods/cggm/direction.py",
   "        cos = F.cosine_similarity(g_F.reshape(1, -1), G, dim=1)",
   "        cos = F.cosine_similarity(W_F.reshape(1, -1), torch.stack([w.reshape(-1) for w in last]), dim=1)"),
 "B applied after clipping (gradient mode scales p.grad in step)": ("cggm/methods/cggm/method.py",
   "        if where == \"gradient\":\n            self.scale_feature_gradients(out, B)",
   "        if where == \"gradient\":\n            self._late_B = B"),
 "rule advanced in loss() (stepped on a skipped batch)": ("cggm/methods/cggm/method.py",
   "        proposal = self.rule.propose(eps)  # B [M], Eq. 7 (or another rule), and the rule's next state",
   "        proposal = self.rule.propose(eps)\n        self.rule.accept(proposal[1])"),
 "rho missing from B (paper rule)": ("cggm/methods/cggm/rules.py",
   "            B = self.rho * (total - delta) / (total + self.denominator_eps)",
   "            B = (total - delta) / (total + self.denominator_eps)"),
 "official rule: guard missing from the numerator": ("cggm/methods/cggm/rules.py",
   "            B = self.rho * (guarded - delta) / guarded", "            B = self.rho * (total - delta) / guarded"),
 "rho missing from B inside L_gm": ("cggm/methods/cggm/direction.py",
   "        return gradient_modulation_loss(B.to(cos.dtype), cos), cos",
   "        return gradient_modulation_loss((B / cggm.rho).to(cos.dtype), cos), cos"),
 "classifiers stepped inside loss()": ("cggm/methods/cggm/method.py",
   "        self.stage(\"eps\", eps)",
   "        self.stage(\"eps\", eps)\n        ps = list(self.classifiers.parameters())\n"
   "        for p, g in zip(ps, torch.autograd.grad(clf_loss, ps, retain_graph=True)):\n            p.grad = g\n"
   "        self.classifier_opt.step()\n        self.classifier_opt.zero_grad()"),
 "classifier gradient not averaged over micro-batches": ("cggm/methods/state.py",
   "                torch._foreach_div_(grads, float(micro_batches))", "                pass"),
 "classifier loss folded into the (GradScaler-scaled) loss": ("cggm/methods/cggm/method.py",
   "        self._clf_loss = clf_loss if not self.micro_batch or self._clf_loss is None else self._clf_loss + clf_loss",
   "        task_loss = task_loss + (clf_loss - clf_loss.detach())  # (same value, one root)"),
 "method.backward() inside an enclosing autocast": ("cggm/methods/protocol.py",
   "        with no_autocast(loss.device.type):\n            self.compute_gradients(loss)",
   "        if True:\n            self.compute_gradients(loss)"),
 "a dropped step keeps the auxiliary modules' gradients": ("cggm/methods/state.py",
   "    def step_dropped(self) -> None:\n        self.zero_grad()", "    def step_dropped(self) -> None:\n        pass"),
 "feature-hook check disabled": ("cggm/methods/protocol.py",
   "        dead = [m for m, fired in self._feature_hooks if not fired[0]]",
   "        dead = []"),
 "plain-loop detection disabled": ("cggm/methods/protocol.py",
   "        if self._n_losses and self._parameter_version() != self._version_mark:",
   "        if False:"),
 "auto picks update for SGD": ("cggm/methods/cggm/parts.py",
   "    if isinstance(optimizer, PLAIN_OPTIMIZERS):\n        return \"gradient\"",
   "    if isinstance(optimizer, PLAIN_OPTIMIZERS):\n        return \"update\""),
 "overlap check disabled": ("cggm/methods/binding.py",
   "            if other != m:", "            if False:"),
 "skip() does not drop the step's state": ("cggm/methods/protocol.py",
   "            for item in self._state_items():\n                item.step_dropped()", "            pass"),
 "own loop without epoch hooks not refused": ("cggm/methods/protocol.py",
   "        if self.support.epoch_hooks and not self._epochs_started:", "        if False:"),
 "B on gradients under accumulation not refused": ("cggm/methods/cggm/method.py",
   "        if where == \"gradient\" and self.micro_batch:", "        if False:"),
 "selected epoch tested with the last epoch's method state": ("cggm/training/trainer.py",
   "            if best_method is not None:", "            if False:"),
 "rho missing from B (robust rule)": ("cggm/methods/cggm/rules.py",
   "        B = self.rho * (total - delta + self.tau * (m - 1) / m) / (total + self.tau)",
   "        B = (total - delta + self.tau * (m - 1) / m) / (total + self.tau)"),
 "underuse rule: EMA read without bias correction": ("cggm/methods/cggm/rules.py",
   "    return ema, ema / (1 - beta ** (steps + 1)), steps + 1", "    return ema, ema, steps + 1",
   ["tests/test_rules_reference.py"]),
 "robust rule: window one step short": ("cggm/methods/cggm/rules.py",
   "        slot = steps % self.window", "        slot = steps % (self.window - 1)", ["tests/test_rules_reference.py"]),
 "sign metric: zero labels counted positive": ("cggm/methods/cggm/parts.py",
   "return ((pred.reshape(target.shape) > 0) == (target > 0))", "return ((pred.reshape(target.shape) > 0) == (target >= 0))",
   ["tests/test_rules_reference.py"]),
 "fp16: gradients clipped before they are unscaled (shared step)": ("cggm/training/step.py",
   "        scaler.unscale_(inner)  # clip the true gradients (GradScaler.step does not unscale twice)",
   "        pass", ["tests/test_fp16_clip_unscaled.py"]),
 "accumulation: the rule commits the first micro-batch's metric": ("cggm/methods/cggm/method.py",
   "        proposal = self.rule.propose(self.staged(\"eps\"))",
   "        proposal = self.rule.propose(self.staged(\"eps\", all=True)[0])", ["tests/test_accumulation_rule.py"]),
 "accumulation: the rule commits the micro-batches' summed metric": ("cggm/methods/cggm/method.py",
   "        proposal = self.rule.propose(self.staged(\"eps\"))",
   "        proposal = self.rule.propose(torch.stack(self.staged(\"eps\", all=True)).sum(0))",
   ["tests/test_accumulation_rule.py"]),
 "clf/ metric: classifiers evaluated in train mode": ("cggm/methods/cggm/parts.py",
   "        clfs.eval()\n", "        clfs.train()\n", ["tests/test_clf_metric.py"]),
 "clf/ metric: averaged over batches, not samples": ("cggm/methods/cggm/parts.py",
   "        n = float(target.shape[0])", "        n = 1.0", ["tests/test_clf_metric.py"]),
 "DDP: the auxiliary modules' gradients summed over ranks, not averaged": ("cggm/distributed.py",
   "    flat /= world_size()", "    pass", ["tests/test_distributed_cggm.py"]),
 "DDP: clf/ metric not reduced across ranks": ("cggm/methods/cggm/parts.py",
   "        super().__init__()\n        self.cggm = cggm", "        super().__init__(sync_on_compute=False)\n        self.cggm = cggm",
   ["tests/test_distributed_cggm.py"]),
 "pmr: prototypes without momentum (the new class means replace them)": ("cggm/methods/pmr.py",
   "        if self.prototypes is None:\n            self.prototypes = new", "        if True:\n            self.prototypes = new",
   ["tests/test_pmr_momentum.py"]),
 "pmr: momentum on the new class means instead of the old prototypes": ("cggm/methods/pmr.py",
   "[self.momentum * old + (1 - self.momentum) * c", "[self.momentum * c + (1 - self.momentum) * old",
   ["tests/test_pmr_momentum.py"]),
 "Dice: a class absent from prediction and target scores 0 (hard Dice)": ("cggm/metrics/dice.py",
   "torch.full_like(total, empty)", "torch.zeros_like(total)", ["tests/test_dice_empty_class.py"]),
 "Dice: a class absent from prediction and target scores 0 (numpy Dice)": ("cggm/metrics/functional.py",
   "if total else float(empty)", "if total else 0.0", ["tests/test_dice_empty_class.py"]),
 "Bayes ceiling: the strong modality's corruption left out of its likelihood": ("cggm/data/synthetic.py",
   "            if rho > 0:", "            if False:", ["tests/test_bayes.py"]),
 "Bayes ceiling: the weak modality's random sign left out of its likelihood": ("cggm/data/synthetic.py",
   "        for sign in ((1.0, -1.0) if self.signed[m] else (1.0,)):", "        for sign in (1.0,):",
   ["tests/test_bayes.py"]),
}
only = sys.argv[1:]
survived = 0
for name, (f, old, new, *tests) in MUTANTS.items():  # an optional 4th item: the tests to run (default TESTS)
    if only and not any(o in name for o in only):
        continue
    shutil.rmtree(MUT / "src", ignore_errors=True)
    shutil.copytree(SRC, MUT / "src")
    p = MUT / "src" / f
    s = p.read_text()
    assert s.count(old) == 1, (name, s.count(old))
    p.write_text(s.replace(old, new))
    env = {**os.environ, "PYTHONPATH": str(MUT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *(tests[0] if tests else TESTS)],
                       cwd=MUT, env=env, capture_output=True, text=True)
    failed = re.findall(r"FAILED (\S+)", r.stdout)
    survived += not failed
    print(f"{name}: {'KILLED by ' + failed[0] if failed else 'SURVIVED'}", flush=True)
shutil.rmtree(MUT, ignore_errors=True)
sys.exit(1 if survived else 0)
