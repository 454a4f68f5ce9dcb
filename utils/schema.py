"""The base of every config schema (kept apart so that schema modules can import it freely)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) that the user can fix.

    Entry points print its message as one ``error:`` line and exit with code 2; every other
    exception is a bug and keeps its traceback.
    """


class ConfigError(UserError, ValueError):
    """An invalid configuration; the message says where and what to change."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
