"""Integrations with training frameworks; each lives in its own module and imports its framework only when used.

- `regprune.integrations.lightning`: `RegPruneCallback`, GReg-1/GReg-2 or SPM pruning inside a
  `lightning.Trainer` run (needs `pip install 'regprune[lightning]'`).

Importing `regprune` or this package never imports a framework.
"""

__all__: list[str] = []
