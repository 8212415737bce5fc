"""Integrations with training frameworks; each lives in its own module and imports its framework only when used.

- `regprune.integrations.lightning`: `RegPruneCallback`, GReg-1/GReg-2 or SPM pruning inside a
  `lightning.Trainer` run (needs `pip install 'regprune[lightning]'`).
- `regprune.integrations.callback_options` (the callback's arguments, checked) and `regprune.integrations.pruning`
  (pruning in place inside a loop someone else runs, optimizers rebound) need no framework.

Importing `regprune` or this package never imports a framework.
"""

__all__: list[str] = []
