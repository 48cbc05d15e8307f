"""Mixed precision (issue 7): exact DP allocation, sensitivity measurement, plan switching and persistence."""

from __future__ import annotations

import itertools
import json
import os
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import QuEPTConfig, get_bits, set_bits
from quept_hf import mixed_precision as mp
from quept_hf.calibration.data import text_windows
from quept_hf.inspection import quept_linears
from quept_hf.mixed_precision import SensitivityTable, allocate, plan_mixed_precision
from quept_hf.nn import fake_quantize_activation

try:
    from tests.conftest_hub import local_hub
except ModuleNotFoundError:  # `tests/` itself on sys.path
    from conftest_hub import local_hub  # type: ignore[no-redef]  # noqa: F401

DOWN = "model.layers.1.mlp.down_proj"
UP = "model.layers.0.mlp.up_proj"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- helpers


def table(values, params, bits, members=None) -> SensitivityTable:
    units = [f"u{i}" for i in range(len(params))]
    return SensitivityTable(
        units=units,
        bits=bits,
        values=torch.tensor(values, dtype=torch.float64),
        params=params,
        members=members or {u: [f"{u}.a", f"{u}.b"] for u in units},
    )


def brute_force(t: SensitivityTable, target: float, weighted: bool) -> tuple[float, int, Fraction]:
    """(cheapest cost, the most budget an optimal plan spends, budget) by enumerating every plan."""
    weights = torch.tensor(t.params if weighted else [1] * len(t.units))
    budget = Fraction(repr(target)) * int(weights.sum())
    combos = torch.tensor(list(itertools.product(range(len(t.bits)), repeat=len(t.units))))
    spends = (torch.tensor(t.bits)[combos] * weights).sum(1)
    costs = t.values.gather(1, combos.T).sum(0)
    feasible = torch.tensor([s <= budget for s in spends.tolist()])
    best = costs[feasible].min()
    return float(best), int(spends[feasible & (costs == best)].max()), budget


def spent(t: SensitivityTable, plan, weighted: bool) -> int:
    weights = t.params if weighted else [1] * len(t.units)
    return sum(w * plan.unit_bits[u] for w, u in zip(weights, t.units, strict=True))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def perturb_adapters(model: torch.nn.Module) -> None:
    """B starts at 0 (no delta): seeded values make every bit-width's delta count in the outputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mbclora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def load(folder: str, mode: str = "weight_only") -> torch.nn.Module:
    ranks = [4] * (4 if mode == "weight_only" else 3)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=QuEPTConfig(mode=mode, ranks=ranks)).eval()


@pytest.fixture(scope="module")
def planned(tiny_llama_dir, ids):
    """A tiny LLaMA with (cheaply attached) MB-CLoRA adapters, a layer table and plans at 2.25 and 3.25 bits."""
    model = load(tiny_llama_dir)
    quept_hf.calibrate(model, ids, epochs=0, num_samples=4, seq_len=16)
    perturb_adapters(model)
    plans = plan_mixed_precision(model, ids, avg_bits=[2.25, 3.25], num_samples=4, seq_len=16)
    return model, plans


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[:2, :16]).logits


# --------------------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_dp_matches_brute_force(seed, weighted):
    gen = torch.Generator().manual_seed(seed)
    units, bits = 5, [2, 3, 4, 8]
    integer = seed % 2 == 0  # small integer costs: many exact ties
    values = torch.randint(0, 4, (units, len(bits)), generator=gen).double() if integer else torch.rand(units, 4)
    params = torch.randint(1, 9, (units,), generator=gen).tolist()
    t = table(values.tolist(), params, bits)
    for target in (2, 2.25, 2.5, 3.1, 3.25, 4.7, 8):
        plan = allocate(t, target, weighted=weighted)
        best, best_spend, budget = brute_force(t, target, weighted)
        assert spent(t, plan, weighted) <= budget
        assert plan.cost == pytest.approx(best, abs=1e-12)
        assert plan.cost == pytest.approx(sum(t.value(u, b) for u, b in plan.unit_bits.items()), abs=1e-12)
        if integer:  # ties: the plan spending the most of the budget wins
            assert spent(t, plan, weighted) == best_spend


def test_budget_is_exact_for_fractional_targets():
    # 4 equal units, bits {2, 3}, and 3 bits are always cheaper: exactly floor(4 * target) - 8 units get 3 bits.
    t = table([[1.0, 0.0]] * 4, [1, 1, 1, 1], [2, 3])
    for target, upgraded in ((2.25, 1), (2.2499, 0), (2.5, 2), (2.75, 3), (3, 4)):
        plan = allocate(t, target)
        assert sum(b == 3 for b in plan.unit_bits.values()) == upgraded
        assert plan.avg_bits == 2 + upgraded / 4 <= target
    # Weighted: params (3, 1), total 4, target 2.25 -> 9 bit-params: only the 1-parameter unit can take 3 bits.
    weighted = allocate(table([[1.0, 0.0], [1.0, 0.0]], [3, 1], [2, 3]), 2.25)
    assert weighted.unit_bits == {"u0": 2, "u1": 3} and weighted.avg_bits == 2.25
    unweighted = allocate(table([[1.0, 0.0], [1.0, 0.0]], [3, 1], [2, 3]), 2.5, weighted=False)
    assert sorted(unweighted.unit_bits.values()) == [2, 3] and unweighted.avg_bits == 2.5


@pytest.mark.parametrize("target", [1.99, 1, 8.01, 9])
def test_infeasible_budget_names_the_feasible_range(target):
    t = table([[1.0, 0.5, 0.1]] * 3, [2, 1, 3], [2, 4, 8])
    with pytest.raises(ValueError, match=r"infeasible.*feasible range is \[2, 8\]"):
        allocate(t, target)


def test_plan_names_expand_units_and_round_trip_the_table(tmp_path):
    t = table([[3.0, 1.0], [0.5, 0.0]], [1, 1], [2, 4])
    plan = allocate(t, 3)
    assert plan.name == "mixed-3" and allocate(t, 2.25).name == "mixed-2.25"
    assert plan.unit_bits == {"u0": 4, "u1": 2}
    assert plan.bits == {"u0.a": 4, "u0.b": 4, "u1.a": 2, "u1.b": 2}
    t.save(tmp_path / "t.safetensors")
    back = SensitivityTable.load(tmp_path / "t.safetensors")
    assert back.units == t.units and back.bits == t.bits and back.members == t.members
    assert torch.equal(back.values, t.values) and back.params == t.params
    with pytest.raises(ValueError, match="NaN"):
        allocate(table([[float("nan"), 0.0]], [1], [2, 4]), 3)


# -------------------------------------------------------------------------------------- measurement


def test_sensitivity_entries_are_the_kl_of_one_swapped_layer(planned, ids):
    """The suffix replay changes nothing: an entry equals the KL of a plain full forward, computed here by hand."""
    model, _ = planned
    t = mp.load_sensitivity(model)
    assert t.granularity == "layer" and len(t.units) == 14 and t.bits == [2, 3, 4, 5, 6, 7, 8]
    assert (t.values >= 0).all() and t.info["metric"] == "kl"
    batch = text_windows(ids, None, num_samples=4, seq_len=16, seed=0)  # the windows the table was measured on
    before = get_bits(model)

    def kl_per_token(target: torch.Tensor) -> float:
        out = F.log_softmax(model(input_ids=batch).logits.float(), -1)
        return float(F.kl_div(out, target, log_target=True, reduction="sum")) / batch.numel()

    with torch.no_grad():
        set_bits(model, 16)
        target = F.log_softmax(model(input_ids=batch).logits.float(), -1)
        set_bits(model, 8)
        reference = kl_per_token(target)
        set_bits(model, {DOWN: 2})
        swapped = kl_per_token(target)
        set_bits(model, {DOWN: 8, UP: 3})
        early = kl_per_token(target)
    set_bits(model, before)
    assert t.value(DOWN, 2) == pytest.approx(swapped, rel=1e-4)
    assert t.value(UP, 3) == pytest.approx(early, rel=1e-4)
    assert t.value(UP, 8) == pytest.approx(reference, rel=1e-4) == t.value(DOWN, 8)
    assert t.value(DOWN, 2) > t.value(DOWN, 8)


def test_block_granularity_expands_to_the_block_linears(planned, ids):
    model, _ = planned
    t = mp.sensitivity(model, ids, granularity="block", num_samples=2, seq_len=16, bits=[2, 3, 8])
    assert t.units == ["model.layers.0", "model.layers.1"] and t.bits == [2, 3, 8]
    assert all(len(m) == 7 for m in t.members.values())
    plan = allocate(t, 2.5)
    assert plan.granularity == "block" and len(plan.bits) == 14
    assert {plan.bits[f"model.layers.{k}.self_attn.q_proj"] for k in (0, 1)} == set(plan.unit_bits.values())
    with pytest.raises(ValueError, match="granularity"):
        mp.sensitivity(model, ids, granularity="head")


# ------------------------------------------------------------------------------------------ switching


def test_plans_switch_through_set_adapter_and_set_bits(planned, ids):
    model, plans = planned
    assert set(plans) == {"mixed-2.25", "mixed-3.25"}
    for name, plan in plans.items():
        assert plan.avg_bits <= plan.target and len(plan.bits) == 14
        model.set_adapter(name)
        assert get_bits(model) == plan.bits
        via_adapter = logits(model, ids)
        set_bits(model, 4)
        assert get_bits(model) == 4
        set_bits(model, name)
        assert get_bits(model) == plan.bits and torch.equal(logits(model, ids), via_adapter)
        set_bits(model, 8)
        set_bits(model, dict(plan.bits))  # the same plan by hand
        assert torch.equal(logits(model, ids), via_adapter)
    assert quept_hf.quept_config(model).plans["mixed-3.25"]["avg_bits"] == plans["mixed-3.25"].avg_bits
    with pytest.raises(ValueError, match=r"mixed-2\.25"):
        model.set_adapter("mixed-9")


def test_plans_without_adapters_and_attached_later(tiny_llama_dir, ids, planned):
    _, plans = planned
    model = load(tiny_llama_dir)
    t = mp.load_sensitivity(planned[0])
    plan_mixed_precision(model, avg_bits=3.25, table=t)
    set_bits(model, "mixed-3.25")
    assert get_bits(model) == plans["mixed-3.25"].bits
    quept_hf.calibrate(model, ids, epochs=0, num_samples=4, seq_len=16)  # adapters attached after planning
    model.set_adapter("mixed-3.25")
    assert get_bits(model) == plans["mixed-3.25"].bits


def test_hand_made_plans_are_validated(planned, ids):
    model, _ = planned
    set_bits(model, 4)
    set_bits(model, {DOWN: 3, UP: 8})
    bits = get_bits(model)
    assert bits[DOWN] == 3 and bits[UP] == 8 and sum(b == 4 for b in bits.values()) == 12
    with pytest.raises(ValueError, match=r"unknown module name.*model\.layers\.9\.mlp\.down_proj"):
        set_bits(model, {DOWN: 2, "model.layers.9.mlp.down_proj": 2})
    with pytest.raises(ValueError, match=r"not available for \{'model.layers.1.mlp.down_proj': 1\}"):
        set_bits(model, {UP: 2, DOWN: 1})
    assert get_bits(model)[DOWN] == 3 and get_bits(model)[UP] == 8  # nothing switched on an error
    with pytest.raises(ValueError, match=r"no bit-width or plan named 'mixed-1'.*'w2'.*'mixed-2.25'"):
        set_bits(model, "mixed-1")
    set_bits(model, "w3")
    assert get_bits(model) == 3
    with pytest.raises(ValueError, match="modules this model lacks"):
        mp.add_plan(model, mp.Plan("mixed-x", 3, 3, True, {}, {"nope": 3}, 0.0))


def test_weight_activation_activation_bits_follow_each_layers_weight_bits(tiny_llama_dir):
    model = load(tiny_llama_dir, mode="weight_activation")
    set_bits(model, {DOWN: 5})
    layer = quept_linears(model)[DOWN]
    x = torch.randn(2, 3, layer.in_features)
    seen = layer.input_transform(x) if layer.input_transform else x  # rotation (default in W+A): online Hadamard
    with torch.no_grad():
        expected = F.linear(fake_quantize_activation(seen, 5), layer.quantized_weight(bits=5), layer.bias)
        assert torch.allclose(layer(x), expected)
    assert layer.activation_bits is None and quept_linears(model)[UP].active_bits == 8


# ---------------------------------------------------------------------------------------- persistence


def test_plans_and_table_persist_through_save_and_from_pretrained(planned, ids, tmp_path, monkeypatch):
    model, plans = planned
    model.set_adapter("mixed-3.25")
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["plans"]["mixed-2.25"]["bits"] == plans["mixed-2.25"].bits
    assert config["plans"]["mixed-2.25"]["target"] == 2.25
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["plans"]["mixed-3.25"] == plans["mixed-3.25"].bits
    with safe_open(os.fspath(tmp_path / mp.SENSITIVITY_NAME), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["bits"]) == [2, 3, 4, 5, 6, 7, 8] and DOWN in json.loads(meta["units"])

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded.set_adapter("mixed-3.25")
    assert get_bits(loaded) == plans["mixed-3.25"].bits
    assert torch.allclose(logits(loaded, ids), expected, atol=1e-5)
    table = mp.load_sensitivity(loaded)
    assert torch.equal(table.values, mp.load_sensitivity(model).values)

    def no_measuring(*args, **kwargs):
        raise AssertionError("the stored table must be reused")

    monkeypatch.setattr(mp, "sensitivity", no_measuring)
    new = plan_mixed_precision(loaded, avg_bits=2.5)
    set_bits(loaded, "mixed-2.5")
    assert get_bits(loaded) == new["mixed-2.5"].bits


def test_plans_and_table_travel_through_the_hub(planned, ids, local_hub):
    model, plans = planned
    model.push_to_hub("me/tiny-mixed")
    assert {mp.SENSITIVITY_NAME, "config.json", "adapter_config.json"} <= set(local_hub.files("me/tiny-mixed"))
    restored = AutoModelForCausalLM.from_pretrained("me/tiny-mixed").eval()
    restored.set_adapter("mixed-2.25")
    assert get_bits(restored) == plans["mixed-2.25"].bits
    assert torch.equal(mp.load_sensitivity(restored).values, mp.load_sensitivity(model).values)


def test_config_plans_are_json_safe_and_validated():
    config = QuEPTConfig(plans={"mixed-3": {"avg_bits": 3.0, "target": 3, "bits": {"a.q_proj": 4, "b": 2}}})
    again = QuEPTConfig.from_dict(json.loads(config.to_json_string()))
    assert again.plans == config.plans
    with pytest.raises(ValueError, match=r"plans\['mixed-3'\] uses bit-widths \[9\]"):
        QuEPTConfig(plans={"mixed-3": {"bits": {"a": 9}}})
    with pytest.raises(ValueError, match="needs a 'bits' mapping"):
        QuEPTConfig(plans={"mixed-3": {"target": 3}})


def test_missing_table_says_how_to_measure(tiny_llama_dir):
    with pytest.raises(ValueError, match="plan_mixed_precision"):
        plan_mixed_precision(load(tiny_llama_dir), avg_bits=3)
