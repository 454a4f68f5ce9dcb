"""Jacobian descent: objective construction, grouping, Gramian providers, weightings."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch

from models.layers import CastedLinear
from models.recursive_reasoning.common import ModelDims
from models.registry import build_loss_head
from training import jd
from training.config import load_pretrain_config
from training.objectives import (
    AGGREGATOR_CLASSES,
    MODES,
    AggregatorConfig,
    ObjectiveSpec,
    mode_spec,
)
from utils.config import compose

B, P, H, S = 8, 900, 3, 4
# The fork's objective counts at B=8, L=900, H=3, S=4 (mattbuot/TinyRecursiveModelsJD,
# ``utils/torchjd_utils.py``: the length of the objective vector of each aggregation strategy).
FORK_M = {
    "sum": 1, "lm_loss_vs_q_halt_loss": 2, "iwrm_with_q_halt_in": B, "iwrm_with_q_halt_out": 2 * B,
    "pixelwise_q_halt_in": P, "pixelwise_q_halt_out": P + B, "iwrm_pixelwise_q_halt_in": B * P,
    "iwrm_pixelwise_q_halt_out": B * P + B, "stack_internal_losses": H + 1,
    "stack_internal_losses_only": H, "stack_internal_and_sum": 1, "stack_supervisions": S,
    "stack_supervisions_and_sum": 1, "stack_supervisions_and_iwrm": S * B,
    "stack_supervisions_and_pixelwise": S * P, "stack_supervisions_and_iwrm_pixelwise": S * B * P,
}  # fmt: skip


def layout_for(spec: ObjectiveSpec, b: int = B, p: int = P, has_halt: bool = True) -> jd.Layout:
    steps = S if spec.supervisions == "stacked" else 1
    families = (0 if spec.internal == "only" else 1) + (H if spec.internal != "none" else 0)
    return jd.Layout(spec=spec, S=steps, C=families, B=b, P=p, has_halt=has_halt)


def atoms(b: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tok = torch.rand(b, p, generator=g, dtype=torch.float64)
    halt = torch.rand(b, generator=g, dtype=torch.float64)
    internal = [torch.rand(b, p, generator=g, dtype=torch.float64) for _ in range(H)]
    return tok, halt, internal


def all_contributions(spec: ObjectiveSpec, b: int = B, p: int = P) -> tuple[torch.Tensor, float]:
    """Σ over steps of the contributions, and the total the objectives must add up to."""
    layout = layout_for(spec, b, p)
    total_c, expected = None, 0.0
    for s in range(layout.S):
        tok, halt, internal = atoms(b, p, seed=s)
        c = jd.step_contributions(layout, s, tok, halt, internal)
        total_c = c if total_c is None else total_c + c
        if spec.internal != "only":
            expected += float(tok.sum()) / layout.S
        if spec.internal != "none":
            expected += (
                spec.intermediate_loss_weight * sum(float(t.sum()) for t in internal) / layout.S
            )
        if spec.halt != "drop":
            expected += float(halt.sum())
    assert total_c is not None
    return total_c, expected


@pytest.mark.parametrize("mode", sorted(MODES))
def test_objectives_of_every_mode_sum_to_the_loss_and_match_the_forks_count(mode: str) -> None:
    spec = mode_spec(mode)
    assert layout_for(spec).m == FORK_M[mode]
    small_b, small_p = 3, 5
    c, expected = all_contributions(spec, small_b, small_p)
    assert c.shape == (small_b, layout_for(spec, small_b, small_p).m)
    assert float(c.sum()) == pytest.approx(expected, rel=1e-12)


# Mode → the objective vector by hand, from a step's token losses [3, 4] and halting losses [3].
HALT_PLACEMENT: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "iwrm_with_q_halt_in": lambda tok, halt: tok.sum(1) + halt,
    "iwrm_with_q_halt_out": lambda tok, halt: torch.cat([tok.sum(1), halt]),
    "lm_loss_vs_q_halt_loss": lambda tok, halt: torch.stack([tok.sum(), halt.sum()]),
    "pixelwise_q_halt_in": lambda tok, halt: tok.sum(0) + halt.sum() / 4,
    "pixelwise_q_halt_out": lambda tok, halt: torch.cat([tok.sum(0), halt]),
    # iwrm × pixel with each sample's halting loss spread over its own 4 pixels.
    "iwrm_pixelwise_own_q_halt_in": lambda tok, halt: (tok + halt[:, None] / 4).reshape(-1),
    # The fork's: the batch's summed halting loss spread over all 3·4 objectives.
    "iwrm_pixelwise_q_halt_in": lambda tok, halt: (tok + halt.sum() / 12).reshape(-1),
}


@pytest.mark.parametrize("mode", list(HALT_PLACEMENT))
def test_halting_placement_by_hand(mode: str) -> None:
    tok, halt, _ = atoms(3, 4, seed=0)
    lay = layout_for(mode_spec(mode), 3, 4)
    obj = jd.step_contributions(lay, 0, tok, halt, None).sum(0)
    torch.testing.assert_close(obj, HALT_PLACEMENT[mode](tok, halt))


def test_stacked_and_internal_layouts_by_hand() -> None:
    w = 0.5
    spec = mode_spec("stack_internal_losses", intermediate_loss_weight=w)
    tok, halt, internal = atoms(2, 3, seed=1)
    obj = jd.step_contributions(layout_for(spec, 2, 3), 0, tok, halt, internal).sum(0)
    expected = torch.stack([tok.sum()] + [w * t.sum() for t in internal]) + halt.sum() / (H + 1)
    torch.testing.assert_close(obj, expected)
    spec = mode_spec("stack_supervisions_and_iwrm")
    lay = layout_for(spec, 2, 3)
    c = jd.step_contributions(lay, 2, tok, halt, None)
    obj = c.sum(0)
    assert torch.count_nonzero(obj[: 2 * 2]) == 0 and torch.count_nonzero(obj[6:]) == 0
    torch.testing.assert_close(obj[4:6], tok.sum(1) / S)  # step 2's samples, halting dropped


def test_grouping_partitions_objectives_identically_on_every_rank() -> None:
    m, k = 23, 5
    A = jd.grouping_matrix(m, k, seed=7, step=3, device=None)
    assert A is not None and A.shape == (m, k)
    assert torch.equal(A.sum(1), torch.ones(m))  # each objective in exactly one group
    assert sorted(A.sum(0).tolist()) == [4.0, 4.0, 5.0, 5.0, 5.0]
    assert torch.equal(A, jd.grouping_matrix(m, k, seed=7, step=3, device=None))
    assert not torch.equal(A, jd.grouping_matrix(m, k, seed=7, step=4, device=None))
    c = torch.rand(4, m, dtype=torch.float64)
    assert float((c @ A.double()).sum()) == pytest.approx(float(c.sum()))
    assert jd.grouping_matrix(m, None, 0, 0, None) is None


def test_gramian_metrics_by_hand() -> None:
    # Two unit gradients at 120°: the mean increases neither; UPGrad-like weights (1, 1)/2.
    G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    m = jd.gramian_metrics(G, torch.tensor([0.5, 0.5]))
    assert m["cos_to_mean"] == pytest.approx(1.0)
    assert m["conflict_rate"] == 1.0 and m["min_pairwise_cos"] == pytest.approx(-0.5)
    assert m["mean_increases"] == 0.0 and m["gramian_trace"] == 2.0 and m["degenerate"] == 0.0
    # A conflicting pair where the mean increases objective 1: G·1/m has a negative entry.
    G = torch.tensor([[1.0, -2.0], [-2.0, 9.0]])
    m = jd.gramian_metrics(G, torch.tensor([1.0, 0.0]))
    assert m["mean_increases"] == 1.0
    assert m["update_conflicts"] == 1.0  # the update g_1 alone increases objective 2
    assert m["norm_ratio_to_mean"] == pytest.approx(1 / math.sqrt(6 / 4))
    assert jd.gramian_metrics(1e-6 * torch.eye(3), torch.ones(3) / 3)["degenerate"] == 1.0


@pytest.mark.parametrize("name", sorted(AGGREGATOR_CLASSES))
def test_every_aggregator_is_constructible_or_says_what_is_missing(name: str) -> None:
    options = {
        "cagrad": {"c": 0.5},
        "krum": {"n_byzantine": 1},
        "trimmed_mean": {"trim_number": 1},
        "fairgrad": {"alpha": 1.0},
        "constant": {"weights": [0.5, 0.5, 0.5, 0.5]},
    }
    config = AggregatorConfig(name=name, options=options.get(name, {}))
    try:
        aggregator = jd.build_aggregator(config, m=4)
    except ValueError as e:
        assert "pip install 'torchjd[full]'" in str(e)  # an optional solver is not installed
        return
    J = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    if config.kind == "gramian":
        w = aggregator(J @ J.T)
        assert w.shape == (4,) and torch.isfinite(w).all()
    else:
        assert aggregator(J).shape == (12,)


# ----------------------------------------------------------------------------------------------
# On a tiny model
# ----------------------------------------------------------------------------------------------
DIMS = ModelDims(batch_size=4, seq_len=10, vocab_size=6, num_puzzle_identifiers=5)


def tiny_head(**overrides: str) -> torch.nn.Module:
    over = ["+experiment=tiny_cpu", "arch.hidden_size=16", "arch.halt_max_steps=3"]
    over += [f"arch.{k}={v}" for k, v in overrides.items()]
    torch.manual_seed(0)
    head = build_loss_head(load_pretrain_config(compose(overrides=over)).arch, DIMS)
    head.train()
    return head


def tiny_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shape = (DIMS.batch_size, DIMS.seq_len)
    return {
        "inputs": torch.randint(0, 6, shape, generator=g, dtype=torch.int32),
        "labels": torch.randint(0, 6, shape, generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.randint(1, 5, (DIMS.batch_size,), generator=g).int(),
    }


def run_objective(
    spec: ObjectiveSpec, aggregator: str, method: str = "auto"
) -> tuple[dict[str, torch.Tensor], jd.JDResult | None]:
    """One optimizer step's gradient under ``spec`` (exploration off: deterministic halting)."""
    head = tiny_head(halt_exploration_prob="0")
    spec = spec.model_copy(update={"method": method})
    batch = tiny_batch()
    steps = S if spec.supervisions == "stacked" else 1
    layout = jd.Layout(spec=spec, S=head.model.config.halt_max_steps if steps > 1 else 1, C=1,
                       B=DIMS.batch_size, P=DIMS.seq_len, has_halt=True)  # fmt: skip
    state = {"carry": head.initial_carry(batch)}

    def contributions():
        for s in range(layout.S):
            torch.manual_seed(100 + s)
            out = head(carry=state["carry"], batch=batch)
            state["carry"] = out.new_carry
            yield jd.step_contributions(layout, s, out.normalized_token_loss,
                                        out.halt_loss_per_sample, None)  # fmt: skip

    params = [p for p in head.parameters() if p.requires_grad]
    result = None
    if layout.m == 1:
        for c in contributions():
            (c.sum() / DIMS.batch_size).backward()
    else:
        descent = jd.JacobianDescent(spec, AggregatorConfig(name=aggregator), head, seed=0)
        result = descent.step(steps=contributions(), layout=layout, params=params,
                              extra_params=[head.model.inner.puzzle_emb.local_weights],
                              global_batch_size=DIMS.batch_size, step_index=1,
                              all_reduce=lambda t: t)  # fmt: skip
    grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    grads["local_weights"] = head.model.inner.puzzle_emb.local_weights.grad.clone()
    return grads, result


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal gradients; a parameter without a gradient on one side must have zeros on the other."""
    for k in a.keys() | b.keys():
        ga = a.get(k, torch.zeros_like(b.get(k, torch.zeros(()))))
        gb = b.get(k, torch.zeros_like(ga))
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    ("mode", "method", "options"),
    [
        ("iwrm_with_q_halt_in", "autogram", {}),
        ("iwrm_with_q_halt_in", "rows", {}),
        ("iwrm_with_q_halt_in", "per_sample", {}),
        ("iwrm_with_q_halt_in", "per_sample", {"groups": 3}),
        ("iwrm_with_q_halt_out", "rows", {}),
        ("iwrm_with_q_halt_out", "per_sample", {}),
        ("lm_loss_vs_q_halt_loss", "rows", {}),
        ("pixelwise_q_halt_in", "rows", {"groups": 4}),
        ("pixelwise_q_halt_in", "auto", {"groups": 4, "gramian": "heads"}),
        ("iwrm_with_q_halt_out", "auto", {"gramian": "heads"}),
        ("lm_loss_vs_q_halt_loss", "auto", {"gramian": "heads"}),
    ],
)
def test_mean_weighting_reproduces_gradient_descent(mode: str, method: str, options: dict) -> None:
    gd, _ = run_objective(mode_spec("sum"), "mean")
    mean, result = run_objective(mode_spec(mode, **options), "mean", method)
    assert_same_grads(gd, mean)
    assert result is not None and result.metrics["jd/cos_to_mean"] == pytest.approx(1.0)


def test_stacked_supervisions_one_step_at_a_time_equal_gradient_descent_over_the_stack() -> None:
    """Each stacked step is differentiated as soon as it ran; with Mean weighting the result is
    the gradient of the summed stack (computed by the m = 1 path, one backward per step)."""
    gd, _ = run_objective(mode_spec("stack_supervisions_and_sum"), "mean")
    mean, result = run_objective(mode_spec("stack_supervisions"), "mean")
    assert_same_grads(gd, mean)
    assert result is not None and result.metrics["jd/num_objectives"] == 3.0


@pytest.mark.parametrize(
    ("mode", "options", "methods"),
    [
        ("iwrm_with_q_halt_in", {}, ("rows", "per_sample", "autogram")),
        ("iwrm_with_q_halt_out", {}, ("rows", "per_sample", "autogram")),
        ("iwrm_with_q_halt_out", {"groups": 5}, ("rows", "per_sample", "autogram")),
        ("stack_supervisions_and_iwrm", {}, ("rows", "per_sample")),
    ],
)
def test_gramian_providers_agree(mode: str, options: dict, methods: tuple[str, ...]) -> None:
    """UPGrad (conflicting objectives, so not the mean) gives the same Gramian and update
    whichever way the Gramian is computed."""
    spec = mode_spec(mode, **options)
    (ref, r_ref), *others = [run_objective(spec, "upgrad", method) for method in methods]
    assert r_ref is not None and r_ref.metrics["jd/cos_to_mean"] < 0.9999
    for (grads, result), method in zip(others, methods[1:], strict=True):
        assert result is not None
        for key in ("jd/gramian_trace", "jd/cos_to_mean", "jd/weight_min", "jd/weight_max"):
            assert result.metrics[key] == pytest.approx(r_ref.metrics[key], rel=1e-4), (method, key)
        assert_same_grads(ref, grads)


def test_auto_picks_the_cheapest_exact_provider() -> None:
    head = tiny_head()
    lay = functools.partial(layout_for, b=DIMS.batch_size, p=DIMS.seq_len)

    def method(mode: str, aggregator: str = "upgrad", model: torch.nn.Module = head, **kw) -> str:
        spec = mode_spec(mode, **kw)
        return jd.JacobianDescent(spec, AggregatorConfig(name=aggregator), model, 0).method(
            lay(spec)
        )

    assert method("iwrm_with_q_halt_in") == "per_sample"
    assert method("iwrm_with_q_halt_out", groups=3) == "per_sample"
    assert method("stack_supervisions_and_iwrm") == "per_sample"
    assert method("iwrm_with_q_halt_in", "config") == "per_sample"  # J is materialised
    assert method("lm_loss_vs_q_halt_loss") == "rows"
    assert method("stack_supervisions") == "rows"
    assert method("pixelwise_q_halt_in", groups=10) == "rows"
    assert method("pixelwise_q_halt_in", groups=10, gramian="heads") == "heads"

    head.register_parameter("stray", torch.nn.Parameter(torch.zeros(2)))  # no per-sample layer
    assert method("iwrm_with_q_halt_in", model=head) == "autogram"
    assert method("iwrm_with_q_halt_out", model=head) == "autogram"
    assert method("iwrm_with_q_halt_in", "config", model=head) == "rows"
    with pytest.raises(ValueError, match=r"per_sample: parameters \['stray'\] are not owned"):
        method("iwrm_with_q_halt_in", model=head, method="per_sample")


def test_per_sample_refuses_a_weight_used_outside_its_layer() -> None:
    """A collected layer's weight also read directly would get a summed gradient: the
    per-sample rows would miss it, so the provider stops."""
    lin = CastedLinear(3, 2, bias=False)
    x = torch.randn(4, 5, 3)
    spec = mode_spec("iwrm_with_q_halt_in")
    layout = jd.Layout(spec=spec, S=1, C=1, B=4, P=1, has_halt=False)

    def steps():
        loss_B = lin(x).square().sum((1, 2)) + lin.weight.sum()  # the direct read
        yield jd.step_contributions(layout, 0, loss_B[:, None], None, None)

    descent = jd.JacobianDescent(spec, AggregatorConfig(name="upgrad"), lin, 0)
    with pytest.raises(ValueError, match=r"shapes \[\(2, 3\)\] got a summed gradient"):
        descent.step(steps=steps(), layout=layout, params=[lin.weight], extra_params=[],
                     global_batch_size=4, step_index=0, all_reduce=lambda t: t)  # fmt: skip
    assert lin.weight.grad is None  # nothing half-written


def test_partial_gramian_is_the_heads_block_of_the_full_one() -> None:
    """gramian: heads uses the rows of lm_head and q_head only: the same numbers as the full
    Jacobian's head columns."""
    head = tiny_head(halt_exploration_prob="0")
    batch = tiny_batch()
    spec = mode_spec("pixelwise_q_halt_in", groups=4)
    layout = jd.Layout(spec=spec, S=1, C=1, B=DIMS.batch_size, P=DIMS.seq_len, has_halt=True)
    grouping = jd.grouping_matrix(layout.m, 4, seed=0, step=1, device=None)
    carry = head.initial_carry(batch)

    def steps():
        out = head(carry=carry, batch=batch)
        yield jd.step_contributions(layout, 0, out.normalized_token_loss,
                                    out.halt_loss_per_sample, None)  # fmt: skip

    params = [p for p in head.parameters() if p.requires_grad]
    full = jd._rows(steps(), layout, params, [], grouping, True, lambda t: t)
    heads = jd.head_parameters(head)
    assert {id(p) for p in heads} == {
        id(p) for n, p in head.named_parameters() if ".lm_head." in n or ".q_head." in n
    }
    offsets = torch.tensor([0, *[p.numel() for p in params]]).cumsum(0).tolist()
    columns = torch.cat(
        [
            torch.arange(offsets[i], offsets[i + 1])
            for i, p in enumerate(params)
            if any(p is h for h in heads)
        ]
    )
    assert full.J is not None
    J_heads = full.J[:, columns]
    partial = jd._heads(steps(), layout, heads, grouping, True, lambda t: t)
    torch.testing.assert_close(partial.G, J_heads @ J_heads.T, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(partial.G, full.G)  # the trunk's gradients are left out


def test_explicit_methods_that_cannot_apply_are_refused() -> None:
    with pytest.raises(ValueError, match="per_sample needs objectives that each belong"):
        mode_spec("pixelwise_q_halt_in", method="per_sample")
    with pytest.raises(ValueError, match="per_sample needs objectives that each belong"):
        ObjectiveSpec(keep=["sample"], halt="separate", method="per_sample")
    with pytest.raises(ValueError, match="autogram differentiates one supervision step"):
        mode_spec("stack_supervisions_and_iwrm", method="autogram")


def test_partial_jacobian_descent_needs_one_step_and_a_gramian_weighting() -> None:
    from utils.config import ConfigError

    with pytest.raises(ValueError, match="gramian: heads needs supervisions: one"):
        mode_spec("stack_supervisions", gramian="heads")
    with pytest.raises(ValueError, match="set method: auto"):
        mode_spec("iwrm_with_q_halt_in", gramian="heads", method="per_sample")
    overrides = ["objective=pixelwise_q_halt_in", "objective.gramian=heads", "aggregator=config"]
    with pytest.raises(ConfigError, match="aggregator 'config' needs the full Jacobian"):
        load_pretrain_config(compose(overrides=overrides))


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("iwrm_with_q_halt_in", {}),
        ("stack_supervisions_and_iwrm", {}),
        ("pixelwise_q_halt_in", {"groups": 6, "gramian": "heads"}),  # in the heads' Gramian
    ],
)
def test_upgrad_update_conflicts_with_no_objective(mode: str, options: dict) -> None:
    _, result = run_objective(mode_spec(mode, **options), "upgrad")
    assert result is not None
    assert result.metrics["jd/update_conflicts"] == 0.0
    assert result.metrics["jd/degenerate"] == 0.0  # unscaled objectives keep trace(G) large


def test_jacobian_aggregators_use_the_materialised_jacobian() -> None:
    grads, result = run_objective(mode_spec("lm_loss_vs_q_halt_loss"), "config")
    assert result is not None and all(torch.isfinite(g).all() for g in grads.values())
    with pytest.raises(ValueError, match="needs method rows"):
        run_objective(mode_spec("iwrm_with_q_halt_in"), "config", "autogram")


def test_fork_knobs_map_to_the_same_spec_as_the_group_names() -> None:
    by_name = load_pretrain_config(compose(overrides=["objective=pixelwise_q_halt_in"]))
    by_knob = load_pretrain_config(
        compose(
            overrides=[
                "+grad_aggregation=pixelwise_q_halt_in",
                "+grad_n_groups=10",
                "+carry_perturbation_rate=0.1",
            ]
        )
    )
    assert by_knob.objective == by_name.objective.model_copy(
        update={"groups": 10, "carry_perturbation_rate": 0.1}
    )
    for mode in MODES:
        arch = "trmjd" if MODES[mode].get("internal") else "trm"
        named = load_pretrain_config(compose(overrides=[f"objective={mode}", f"arch={arch}"]))
        knob = load_pretrain_config(
            compose(overrides=[f"+grad_aggregation={mode}", f"arch={arch}"])
        )
        assert named.objective == knob.objective == mode_spec(mode), mode


def test_modes_that_cannot_apply_fail_at_start_up_saying_which_fit() -> None:
    from utils.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"needs per-H-cycle losses, which arch=trm does not output \(trmjd does\); .*: sum",
    ):
        load_pretrain_config(compose(overrides=["objective=stack_internal_losses"]))
    with pytest.raises(ConfigError, match="arch=trmjd has no halting head; modes that fit"):
        load_pretrain_config(compose(overrides=["objective=iwrm_with_q_halt_out", "arch=trmjd"]))


def test_jacobian_descent_with_frozen_weights_fails_at_start_up() -> None:
    from utils.config import ConfigError

    overrides = ["objective=iwrm_with_q_halt_in", "freeze_weights=True"]
    with pytest.raises(ConfigError, match="freeze_weights trains only the puzzle embedding"):
        load_pretrain_config(compose(overrides=overrides))
    assert load_pretrain_config(compose(overrides=["freeze_weights=True"])).freeze_weights
