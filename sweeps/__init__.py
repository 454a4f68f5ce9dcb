"""Hyper-parameter sweeps over ``pretrain.py``: a W&B Bayesian sweep, or a local Optuna study.

``space`` reads a ``config/sweep/*.yaml`` file, ``trial_config`` checks a trial's overrides,
``launcher`` runs one trial and follows its metrics, ``optuna_backend`` and ``wandb_backend``
drive the trials, ``cli`` is ``sweep.py``'s command line, and ``in_sweep`` runs a trial of the
JD fork's own W&B sweep definition (``pretrain.py +in_sweep=True``, its values read from
``wandb.config``).
"""
