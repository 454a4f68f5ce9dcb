"""Hyper-parameter sweep over ``pretrain.py``.

    python sweep.py trm_seeds                        # config/sweep/trm_seeds.yaml
    python sweep.py jd_fork --backend wandb --create-only
    python sweep.py trm_seeds --backend optuna --output-dir checkpoints/sweeps/s1 --resume
    python sweep.py config/sweep/my_space.yaml data_paths="[data/x]"  # extra trial overrides

With a W&B account (``WANDB_API_KEY`` or a netrc entry) the default backend creates a Bayesian
W&B sweep with hyperband early termination and runs its trials with ``wandb agent``; without
one, the same file runs locally as an Optuna study (TPE sampler, median pruning, SQLite
storage, resumable). See ``sweeps/`` and ``config/sweep/``.
"""

from __future__ import annotations

import sys

from sweeps.cli import main

if __name__ == "__main__":
    sys.exit(main())
