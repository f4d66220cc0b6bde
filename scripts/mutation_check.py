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
TESTS = ["tests/test_equations.py", "tests/test_trust.py", "tests/methods", "tests/test_engine.py", "-k", "not 100k"]
MUTANTS = {
 "weights for gradients (A1) in the direction term": ("cggm/methods/cggm.py",
   "cos = torch.stack([F.cosine_similarity(g_F.flatten(), g.flatten().to(g_F.dtype), dim=0)\n                           for g in clf_last_grads])",
   "cos = torch.stack([F.cosine_similarity(W_F.flatten(), c.last.weight.flatten().to(W_F.dtype), dim=0)\n"
   "                           for c in cggm.classifiers])"),
 "B applied after clipping (gradient mode scales p.grad in step)": ("cggm/methods/cggm.py",
   "        if where == \"gradient\":\n            self.scale_feature_gradients(out, B)",
   "        if where == \"gradient\":\n            self._late_B = B"),
 "rule advanced in loss() (stepped on a skipped batch)": ("cggm/methods/cggm.py",
   "        proposal = self.rule.propose(eps)  # B [M], Eq. 7 (or another rule), and the rule's next state",
   "        proposal = self.rule.propose(eps)\n        self.rule.accept(proposal[1])"),
 "rho missing from B (paper rule)": ("cggm/methods/improvement.py",
   "        B = self.rho * (total - delta) / (total + self.denominator_eps)",
   "        B = (total - delta) / (total + self.denominator_eps)"),
 "rho missing from B inside L_gm": ("cggm/methods/cggm.py",
   "        return gradient_modulation_loss(B.to(cos.dtype), cos), cos",
   "        return gradient_modulation_loss((B / cggm.rho).to(cos.dtype), cos), cos"),
 "classifiers stepped inside loss()": ("cggm/methods/cggm.py",
   "        self._staged.append((eps, grads))",
   "        self._staged.append((eps, grads))\n        for p, g in zip(self.classifiers.parameters(), grads):\n"
   "            p.grad = g\n        self.classifier_opt.step()"),
 "feature-hook check disabled": ("cggm/methods/base.py",
   "        dead = [m for m, fired in self._feature_hooks if not fired[0]]",
   "        dead = []"),
 "plain-loop detection disabled": ("cggm/methods/base.py",
   "        if self._n_losses and self._parameter_version() != self._version_mark:",
   "        if False:"),
 "auto picks update for SGD": ("cggm/methods/cggm.py",
   "        if isinstance(self.optimizer, PLAIN_OPTIMIZERS):\n            return \"gradient\"",
   "        if isinstance(self.optimizer, PLAIN_OPTIMIZERS):\n            return \"update\""),
 "overlap check disabled": ("cggm/methods/base.py",
   "                if other != m:", "                if False:"),
 "skip() does not discard": ("cggm/methods/base.py",
   "        if self._n_losses:\n            self.discard()", "        pass"),
 "rho missing from B (robust rule)": ("cggm/methods/improvement.py",
   "        B = self.rho * (total - delta + self.tau * (m - 1) / m) / (total + self.tau)",
   "        B = (total - delta + self.tau * (m - 1) / m) / (total + self.tau)"),
}
only = sys.argv[1:]
survived = 0
for name, (f, old, new) in MUTANTS.items():
    if only and not any(o in name for o in only):
        continue
    shutil.rmtree(MUT / "src", ignore_errors=True)
    shutil.copytree(SRC, MUT / "src")
    p = MUT / "src" / f
    s = p.read_text()
    assert s.count(old) == 1, (name, s.count(old))
    p.write_text(s.replace(old, new))
    env = {**os.environ, "PYTHONPATH": str(MUT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                       cwd=MUT, env=env, capture_output=True, text=True)
    failed = re.findall(r"FAILED (\S+)", r.stdout)
    survived += not failed
    print(f"{name}: {'KILLED by ' + failed[0] if failed else 'SURVIVED'}", flush=True)
shutil.rmtree(MUT, ignore_errors=True)
sys.exit(1 if survived else 0)
