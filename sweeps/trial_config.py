"""A trial's overrides checked with ``pretrain.py``'s own schema before anything is launched."""

from __future__ import annotations

from utils.config import compose, lenient_overrides
from utils.schema import ConfigError


def check_trial_overrides(overrides: list[str]) -> None:
    """Compose ``config/cfg_pretrain.yaml`` with ``overrides`` exactly as ``pretrain.py`` does
    (misspelt keys reach the validation) and validate it; ``ConfigError`` (one line) if the
    trial would be refused at start-up. Reads no data and starts no process."""
    from hydra.errors import HydraException

    from training.config import load_pretrain_config

    try:
        cfg = compose(overrides=lenient_overrides(overrides))
    except HydraException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"overrides {' '.join(overrides)}: {first}") from None
    load_pretrain_config(cfg)
