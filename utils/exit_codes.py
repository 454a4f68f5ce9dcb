"""Exit codes and ``error:`` lines of the command-line entry points, in one place.

``pretrain.py``, ``evaluate.py`` and ``python -m tracing.trace`` share them: 2 for input
problems (``utils.schema.UserError``, missing files), with configuration errors printed by rank
0 only since every rank finds the same; 3 when a collective timed out or lost a peer
(``utils.distributed.CollectiveError``), one line from each rank that noticed. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from utils.distributed import CollectiveError, MainRankError, env_rank, env_world_size, exit_now
from utils.schema import ConfigError, UserError


@contextmanager
def user_errors_exit(silent_rank_grace_s: float = 0.0) -> Iterator[None]:
    """Turn the failures a user can fix, raised inside, into one ``error:`` line and an exit.

    ``silent_rank_grace_s``: how long a rank other than 0 that found a configuration error
    waits before exiting, so that torchrun, which stops every process at the first exit, lets
    rank 0 print the error.
    """
    try:
        yield
    except CollectiveError as e:
        print(f"error: {e}", file=sys.stderr)
        exit_now(3)
    except (ConfigError, MainRankError) as e:  # the same on every rank: rank 0 reports it
        if env_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        elif silent_rank_grace_s > 0 and env_world_size() > 1:
            time.sleep(silent_rank_grace_s)
        sys.exit(2)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
