"""Integrations with training frameworks.

* :mod:`cggm.integrations.lightning`: any registered method inside a PyTorch Lightning ``Trainer``
  (``pip install 'cggm[lightning]'``).

HF Accelerate, AMP (bf16 autocast, fp16 with a ``GradScaler``) and ``torch.compile`` need no glue
code: README.md, section "Lightning, Accelerate, AMP and torch.compile", shows the calls.
"""
