"""The run folder's record of what produced the run: the resolved config and the source code.

At the start of training rank 0 writes into ``checkpoint_path`` (``save_code=True``):

- ``all_config.yaml``: the validated, resolved config (``config.model_dump(mode="json")``), the
  JD fork's file name; ``training.config.validate_pretrain_config`` reads it back to the same
  config;
- ``code/``: every ``.py`` file of the project's packages (all but ``tests``) and its entry
  scripts, and every ``config/**/*.yaml``, at their paths relative to the project root, with
  ``code/git.txt`` (``git rev-parse HEAD`` and ``git status --porcelain``) when the project is
  a git checkout and git is installed.

The JD fork copies only the model's and the loss head's files and overwrites its
``all_config.yaml`` on every start. Here nothing already in the folder is replaced: a resumed
run keeps the first start's ``code/`` and ``all_config.yaml``, and when its resolved config
differs it is written beside them as ``all_config.resume_step_<N>.yaml`` (``N`` the step the
run continues from). Files are written under a temporary name and renamed into place, so an
interrupted start leaves no half-written record. With W&B the code folder is also logged as
the run's code artifact (``wandb.run.log_code``, ``utils.logging.CodeLogger``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from training.config import PretrainConfig
from utils.logging import CodeLogger, RunLogger

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = "all_config.yaml"
CODE_DIR = "code"
GIT_FILE = "git.txt"
# Packages that did not produce the run: their code is not part of its record.
_NOT_RUN_CODE = frozenset({"tests"})
_GIT_TIMEOUT_S = 30.0


def project_sources(root: Path = PROJECT_ROOT) -> Iterator[Path]:
    """The files ``code/`` holds, relative to ``root``, sorted: the top-level ``*.py`` entry
    scripts, every ``*.py`` under a top-level package (a folder with ``__init__.py``) other than
    ``tests``, and ``config/**/*.yaml``."""
    found: list[Path] = [p.relative_to(root) for p in root.glob("*.py") if p.is_file()]
    for folder in sorted(root.iterdir()):
        if folder.name not in _NOT_RUN_CODE and (folder / "__init__.py").is_file():
            found += [p.relative_to(root) for p in folder.rglob("*.py") if p.is_file()]
    if (root / "config").is_dir():
        found += [p.relative_to(root) for p in (root / "config").rglob("*.yaml") if p.is_file()]
    yield from sorted(set(found))


def git_state(root: Path = PROJECT_ROOT) -> str | None:
    """``"commit <sha>\\nstatus:\\n<git status --porcelain>"`` for the checkout at ``root``;
    None when git is not installed, ``root`` is not in a git checkout or git fails."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
            timeout=_GIT_TIMEOUT_S, check=False,
        )  # fmt: skip
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
            timeout=_GIT_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if status.returncode != 0:
        return None
    return f"commit {head.stdout.strip()}\nstatus:\n{status.stdout}"


def config_yaml(config: PretrainConfig) -> str:
    """``config`` as the YAML text of ``all_config.yaml`` (fields in their declared order)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _write_new(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_code(folder: Path, root: Path) -> None:
    """Copy the project's sources into a temporary folder beside ``folder``, then rename it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for rel in project_sources(root):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, target)
        state = git_state(root)
        if state is not None:
            (tmp / GIT_FILE).write_text(state, encoding="utf-8")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; None when it does not parse (then it differs)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _resume_config_path(run_dir: Path, step: int, text: str) -> Path | None:
    """Where a resumed run's differing config goes: ``all_config.resume_step_<step>.yaml``, or
    ``..._<k>.yaml`` when an earlier resume from the same step left a different one; None when
    one of them already holds this config."""
    wanted = yaml.safe_load(text)
    for k in range(1000):
        suffix = "" if k == 0 else f"_{k}"
        path = run_dir / f"all_config.resume_step_{step}{suffix}.yaml"
        if not path.exists():
            return path
        if _load_yaml(path) == wanted:
            return None
    raise FileExistsError(f"{run_dir}: 1000 all_config.resume_step_{step}_*.yaml files")


def write_run_files(
    config: PretrainConfig, step: int, logger: RunLogger, root: Path = PROJECT_ROOT
) -> list[Path]:
    """Rank 0's record of the run in ``config.checkpoint_path`` (see the module docstring);
    ``step`` is the step training starts or resumes at. Returns the paths written now (none
    when ``save_code`` is off, there is no ``checkpoint_path``, or everything is there). The
    code folder, new or kept, goes to ``logger.log_code`` when ``logger`` keeps code.
    """
    if not config.save_code or not config.checkpoint_path:
        return []
    run_dir = Path(config.checkpoint_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    text = config_yaml(config)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        _write_new(config_path, text)
        written.append(config_path)
    elif _load_yaml(config_path) != yaml.safe_load(text):
        resume_path = _resume_config_path(run_dir, step, text)
        if resume_path is not None:
            _write_new(resume_path, text)
            written.append(resume_path)
    code_dir = run_dir / CODE_DIR
    if not code_dir.exists():
        _write_code(code_dir, root)
        written.append(code_dir)
    if isinstance(logger, CodeLogger):
        logger.log_code(code_dir)
    return written
