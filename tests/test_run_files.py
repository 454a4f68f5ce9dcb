"""The run folder's record (``training.run_files``): ``all_config.yaml`` and ``code/`` after a
tiny run, kept on resume, absent with ``save_code=False`` or when the data checks fail."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_puzzle_dataset import write_split
from training.config import PretrainConfig, load_pretrain_config, validate_pretrain_config
from training.loop import RunOutcome, run_training
from training.run_files import project_sources, write_run_files
from utils.config import compose
from utils.distributed import DistInfo
from utils.logging import MultiLogger, NullLogger, build_logger
from utils.schema import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "+experiment=tiny_cpu",
    "logger=none",
    "data_workers=0",
    "global_batch_size=4",
    "arch.hidden_size=16",
    "arch.H_cycles=2",
    "arch.L_cycles=1",
    "arch.halt_max_steps=2",
    "lr_warmup_steps=2",
    "epochs=2",
    "eval_interval=2",
    "evaluators=[]",
]


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_split(root, "train")
    write_split(root, "test")
    return root


def make_config(data: Path, run_dir: Path, *overrides: str) -> PretrainConfig:
    return load_pretrain_config(
        compose(
            overrides=[*TINY, f"data_paths=[{data}]", f"+checkpoint_path={run_dir}", *overrides]
        )
    )


def train(config: PretrainConfig) -> RunOutcome:
    logger = build_logger("none", project="p", run_name="r", config={},
                          run_dir=config.checkpoint_path, is_main=True)  # fmt: skip
    return run_training(config, DistInfo(), logger=logger)


def test_a_run_records_its_config_and_code(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = make_config(tiny_data, run_dir, "max_steps=2")
    assert train(config).steps == 2
    text = (run_dir / "all_config.yaml").read_text()
    assert validate_pretrain_config(yaml.safe_load(text)) == config
    assert yaml.safe_load(text)["arch"]["hidden_size"] == 16
    code = run_dir / "code"
    for rel in ("training/loop.py", "pretrain.py", "models/layers.py", "config/cfg_pretrain.yaml",
                "config/arch/trm.yaml", "config/experiment/tiny_cpu.yaml"):  # fmt: skip
        assert (code / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    assert not (code / "tests").exists()
    copied = {p.relative_to(code) for p in code.rglob("*") if p.is_file()}
    wanted = {p.relative_to(REPO) for p in REPO.glob("config/**/*.yaml")}
    wanted |= {p.relative_to(REPO) for p in REPO.glob("training/*.py")}
    assert wanted <= copied
    assert all(p.suffix in (".py", ".yaml") or p == Path("git.txt") for p in copied)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        lines = (code / "git.txt").read_text().splitlines()
        assert lines[0] == f"commit {head.stdout.strip()}" and lines[1] == "status:"
    # Temporary names were all renamed into place.
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]


def test_resume_keeps_the_record_and_adds_a_differing_config(
    tiny_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first = make_config(tiny_data, run_dir, "max_steps=2", "resume=auto")
    train(first)
    original = (run_dir / "all_config.yaml").read_bytes()
    (run_dir / "code" / "marker.txt").write_text("the first start's code folder")
    # The same config resumed: nothing new, nothing replaced.
    assert write_run_files(first, 2, NullLogger()) == []
    assert sorted(p.name for p in run_dir.glob("all_config*")) == ["all_config.yaml"]
    # A longer run resumed from step 2: its config goes beside the first one.
    longer = make_config(tiny_data, run_dir, "max_steps=3", "resume=auto")
    assert train(longer).steps == 3
    assert (run_dir / "all_config.yaml").read_bytes() == original
    assert (run_dir / "code" / "marker.txt").exists()
    resumed = run_dir / "all_config.resume_step_2.yaml"
    assert validate_pretrain_config(yaml.safe_load(resumed.read_text())) == longer
    assert yaml.safe_load(resumed.read_text())["max_steps"] == 3
    # Another differing config from the same step keeps the earlier resume file too.
    other = make_config(tiny_data, run_dir, "max_steps=4", "resume=auto")
    written = write_run_files(other, 2, NullLogger())
    assert written == [run_dir / "all_config.resume_step_2_1.yaml"]
    assert yaml.safe_load(resumed.read_text())["max_steps"] == 3
    assert write_run_files(other, 2, NullLogger()) == []


def test_save_code_false_writes_neither(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(make_config(tiny_data, run_dir, "max_steps=1", "+save_code=False"))
    assert (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "all_config.yaml").exists() and not (run_dir / "code").exists()


def test_a_run_that_fails_its_data_check_leaves_no_folder(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # The hand-written data's sequences are 4 tokens, not ARC's 900-cell grids.
    config = make_config(tiny_data, run_dir, "+log_predictions_every=1")
    with pytest.raises(ConfigError, match="log_predictions_every"):
        train(config)
    assert not run_dir.exists()


class CodeRecorder:
    """A logger that keeps the code folders it is sent (and drops everything else)."""

    def __init__(self) -> None:
        self.folders: list[Path] = []

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_images(self, key: str, images: Any, captions: Any, step: int) -> None: ...

    def log_curve(self, key: str, xs: Any, ys: Any, step: int, x_name: str) -> None: ...

    def log_code(self, folder: str | Path) -> None:
        self.folders.append(Path(folder))

    def finish(self) -> None: ...


class NoCodeLogger:
    """A logger without ``log_code`` (written before it existed): it must still work."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_images(self, key: str, images: Any, captions: Any, step: int) -> None: ...

    def log_curve(self, key: str, xs: Any, ys: Any, step: int, x_name: str) -> None: ...

    def finish(self) -> None: ...


def test_the_code_folder_goes_to_loggers_that_take_code(tmp_path: Path) -> None:
    root = tmp_path / "project"
    for rel in ("run.py", "pkg/__init__.py", "pkg/a.py", "pkg/sub/b.py", "pkg/notes.txt",
                "tests/__init__.py", "tests/test_a.py", "scripts/loose.py", "config/c.yaml",
                "config/group/d.yaml", "config/e.json"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    assert [str(p) for p in project_sources(root)] == [
        "config/c.yaml", "config/group/d.yaml", "pkg/__init__.py", "pkg/a.py", "pkg/sub/b.py",
        "run.py",
    ]  # fmt: skip
    config = validate_pretrain_config(
        {**yaml.safe_load(yaml.safe_dump(_base_dump())), "checkpoint_path": str(tmp_path / "r")}
    )
    recorder = CodeRecorder()
    logger = MultiLogger([NullLogger(), recorder, NoCodeLogger()])
    write_run_files(config, 0, logger, root=root)
    code = tmp_path / "r" / "code"
    assert recorder.folders == [code]
    assert (code / "pkg" / "sub" / "b.py").read_text() == "# pkg/sub/b.py\n"
    assert not (code / "git.txt").exists()  # not a git checkout: no git state, no error
    write_run_files(config, 5, logger, root=root)  # a resume logs the kept folder again
    assert recorder.folders == [code, code]


def _base_dump() -> dict[str, Any]:
    config = load_pretrain_config(compose(overrides=[*TINY, "data_paths=[data/x]"]))
    return config.model_dump(mode="json")
