"""tuneforge's Hydra sweeper on current Optuna (`hydra/sweeper=optuna`); see sweeper.py.

hydra-optuna-sweeper, the plugin this replaces, pins optuna<3 (2021); no maintained plugin on current Optuna
exists (checked on PyPI, December 2026). Hydra finds this package in its `hydra_plugins` namespace."""
