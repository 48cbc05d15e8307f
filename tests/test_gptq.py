"""Error-compensated freezing (issue 19): GPTQ rounding on QuEPT's calibrated grid.

The reference is the GPTQ paper's algorithm written out column by column (no lazy batches, no act-order
bookkeeping beyond a permutation): the library's blocked version must give the same codes. The grid is the
calibrated one, so scales and zero points equal plain rounding's bit for bit; only codes move, and the layer's
output error on the calibration inputs goes down. With ``grid_search`` a row may take the float weight's min/max
grid instead, exactly where that lowers its output error.
"""

from __future__ import annotations

import pytest
import torch

import quept_hf
from quept_hf import freeze, get_bits, set_bits
from quept_hf.calibration.compensation import input_hessians
from quept_hf.calibration.gptq import (
    SHRINK,
    InputHessians,
    compensated_weight_codes,
    refit_scales,
    searched_clipping,
)
from quept_hf.inspection import frozen_linears, quept_linears
from quept_hf.nn.functional import _group_view, fake_quantize_weight, quantize_weight_codes, weight_qparams

try:
    from tests.test_packing_export import elastic_model, ids, logits
except ModuleNotFoundError:  # `tests/` itself on sys.path
    from test_packing_export import elastic_model, ids, logits  # type: ignore[no-redef]

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated, unevenly scaled features, as real activations are (GPTQ gains nothing on white noise)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) / width**0.5 + torch.eye(width)
    scale = torch.logspace(-1, 1, width)[torch.randperm(width, generator=gen)]
    return (torch.randn(n, width, generator=gen) @ mix) * scale


def dequantize(codes, scales, zeros, group_size):
    grouped = _group_view(codes.float(), group_size)
    return (scales.unsqueeze(-1) * (grouped - zeros.unsqueeze(-1))).reshape(codes.shape[0], -1)[:, : codes.shape[1]]


def reference_gptq(weight, hessian, bits, upper, lower, group_size, act_order=True, damping=0.01, target=None):
    """GPTQ (Frantar et al., Algorithm 1) one column at a time, on a fixed ("static") grid: that of ``weight``."""
    scale, zero = weight_qparams(weight, bits, upper, lower, group_size)
    groups = scale.shape[1]
    size = weight.shape[1] if groups == 1 else group_size
    w, h = (weight if target is None else target).clone().double(), hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        g = order[j].item() // size
        s, z = scale[:, g, 0].double(), zero[:, g, 0].double()
        q = torch.clamp(torch.round(w[:, j] / s) + z, 0, 2**bits - 1)
        codes[:, j] = q
        err = (w[:, j] - s * (q - z)) / u[j, j]
        w[:, j:] -= err.unsqueeze(1) * u[j, j:].unsqueeze(0)
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out.to(torch.uint8)


@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(3, 32, True), (4, -1, True), (2, 48, False)])
def test_codes_match_the_column_by_column_reference(bits, group_size, act_order):
    torch.manual_seed(0)
    weight = torch.randn(24, 160)
    x = correlated_inputs(512, 160)
    hessian = 2 * x.T @ x / x.shape[0]
    upper = torch.full((24, 1 if group_size == -1 else -(-160 // group_size)), 3.0)
    lower = upper.clone()
    grid = (bits, upper, lower, group_size)
    codes, scales, zeros = compensated_weight_codes(weight, hessian, *grid, act_order=act_order)
    expected = reference_gptq(weight, hessian, *grid, act_order=act_order)
    agree = (codes == expected).float().mean().item()
    assert agree > 0.999, agree  # float32 against float64: a rare tie may round the other way
    _, plain_scales, plain_zeros = quantize_weight_codes(weight, bits, upper, lower, group_size)
    assert torch.equal(scales, plain_scales) and torch.equal(zeros, plain_zeros)  # the calibrated grid, unchanged


def test_codes_reproduce_the_target_on_the_grid_of_the_weight():
    """freeze's use: the grid of W + ΔW_b, the outputs of the float W."""
    torch.manual_seed(3)
    weight, delta = torch.randn(12, 96), 0.05 * torch.randn(12, 96)
    x = correlated_inputs(256, 96, seed=4)
    hessian = 2 * x.T @ x / x.shape[0]
    logit = torch.full((12, 3), 2.5)
    codes, scales, _ = compensated_weight_codes(weight + delta, hessian, 3, logit, logit, 32, target=weight)
    expected = reference_gptq(weight + delta, hessian, 3, logit, logit, 32, target=weight)
    assert (codes == expected).float().mean().item() > 0.999
    assert torch.equal(scales, quantize_weight_codes(weight + delta, 3, logit, logit, 32)[1])
    assert not torch.equal(codes, compensated_weight_codes(weight + delta, hessian, 3, logit, logit, 32)[0])


def row_errors(weight, codes, scales, zeros, group_size, hessian):
    error = weight - dequantize(codes, scales, zeros, group_size)
    return ((error @ hessian) * error).sum(dim=1)


def test_grid_search_keeps_each_rows_best_grid():
    """Per row, the calibrated grid, the target's min/max grid, its importance-searched clipping or the nested
    grid, whichever GPTQ reproduces best: never worse than any of them, and the clipped rows leave their grid."""
    torch.manual_seed(5)
    weight = torch.randn(40, 96)
    x = correlated_inputs(512, 96, seed=6)
    hessian = 2 * x.T @ x / x.shape[0]
    logit = torch.full((40, 3), 2.5)
    logit[:20] = 0.0  # half the rows clipped to half their range: the min/max grid suits those better
    full = torch.full_like(logit, float("inf"))
    searched = searched_clipping(weight, hessian, 3, 32, "integer")
    candidates = [compensated_weight_codes(weight, hessian, 3, u, u, 32) for u in (logit, full, searched)]
    best = compensated_weight_codes(weight, hessian, 3, logit, logit, 32, grid_search=True)
    errors = torch.stack([row_errors(weight, *result, 32, hessian) for result in candidates])
    best_errors = row_errors(weight, *best, 32, hessian)
    assert (best_errors <= errors.min(dim=0).values * (1 + 1e-5)).all()
    calibrated_rows = (best[0] == candidates[0][0]).all(dim=1)  # codes: the scales are refit afterwards
    assert not calibrated_rows[:20].any() and calibrated_rows[20:].any()  # the clipped rows moved, not all rows did
    for row in range(40):  # each row is one candidate's GPTQ result, unchanged
        assert any(torch.equal(best[0][row], c[0][row]) for c in candidates) or best_errors[row] < errors[:, row].min()


def test_refit_scales_lowers_every_rows_output_error():
    """Least squares on ``e H e^T`` with the codes fixed: never worse per row, better for most, positive scales."""
    torch.manual_seed(9)
    weight = torch.randn(24, 96)
    x = correlated_inputs(512, 96, seed=10)
    hessian = 2 * x.T @ x / x.shape[0]
    logit = torch.full((24, 3), 2.0)
    codes, scales, zeros = compensated_weight_codes(weight, hessian, 3, logit, logit, 32)
    refit = refit_scales(weight, codes, scales, zeros, hessian, 32)
    before = row_errors(weight, codes, scales, zeros, 32, hessian)
    after = row_errors(weight, codes, refit, zeros, 32, hessian)
    assert (after <= before * (1 + 1e-5)).all() and (after < 0.99 * before).float().mean() > 0.5
    assert (refit > 0).all() and refit.shape == scales.shape


def test_searched_clipping_minimises_the_importance_weighted_error():
    """The chosen factor beats full range and every other factor on ``sum diag(H) (w - Q(w))^2`` per group."""
    torch.manual_seed(7)
    weight = torch.randn(6, 64) * torch.linspace(0.2, 3, 64)
    hessian = torch.diag(torch.rand(64) + 0.05)
    chosen = searched_clipping(weight, hessian, 3, 32, "symmetric")
    importance = torch.diag(hessian).reshape(1, 2, 32)

    def weighted(logits):
        q = fake_quantize_weight(weight, 3, logits, logits, 32, "symmetric")
        return ((weight - q).reshape(6, 2, 32) ** 2 * importance).sum(-1)

    best = weighted(chosen)
    for factor in SHRINK:
        other = torch.full_like(chosen, float("inf") if factor >= 1 else float(torch.logit(torch.tensor(factor))))
        assert (best <= weighted(other) + 1e-7).all()


def test_uncorrelated_inputs_give_plain_rounding():
    """A diagonal Hessian couples no columns: nothing to compensate, the codes ARE round-to-nearest."""
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    hessian = torch.diag(torch.rand(64) + 0.1)
    hessian[5, 5] = 0.0  # a column no input reaches
    logit = torch.full((16, 2), 2.0)
    codes, _, _ = compensated_weight_codes(weight, hessian, 3, logit, logit, 32)
    assert torch.equal(codes, quantize_weight_codes(weight, 3, logit, logit, 32)[0])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_output_error_is_lower_than_plain_rounding(bits):
    torch.manual_seed(2)
    weight = torch.randn(32, 128)
    x = correlated_inputs(1024, 128, seed=3)
    hessian = 2 * x.T @ x / x.shape[0]
    logit = torch.full((32, 1), 3.0)
    gptq = dequantize(*compensated_weight_codes(weight, hessian, bits, logit, logit, -1), -1)
    plain = dequantize(*quantize_weight_codes(weight, bits, logit, logit, -1), -1)
    gptq_error = ((weight - gptq) @ x.T).pow(2).mean()
    plain_error = ((weight - plain) @ x.T).pow(2).mean()
    assert gptq_error < 0.8 * plain_error, (gptq_error, plain_error)


def test_bad_hessian_shape_is_refused():
    logit = torch.full((4, 1), 3.0)
    with pytest.raises(ValueError, match=r"hessian has shape \(8, 8\); the layer needs \(16, 16\)"):
        compensated_weight_codes(torch.randn(4, 16), torch.eye(8), 4, logit, logit, -1)


def test_input_hessians_are_the_mean_outer_product_over_calls():
    layer, sibling, scaled = torch.nn.Linear(6, 3), torch.nn.Linear(6, 2), torch.nn.Linear(6, 2)
    xs = [torch.randn(2, 5, 6), torch.randn(7, 6)]
    inputs = lambda module, x: 3 * x if module is scaled else x  # noqa: E731
    with InputHessians({"layer": layer, "sibling": sibling, "scaled": scaled}, inputs=inputs) as collected:
        for x in xs:
            layer(x), sibling(x), scaled(x)  # siblings reading one tensor share its product
    flat = torch.cat([x.reshape(-1, 6) for x in xs])
    for name, factor in (("layer", 1), ("sibling", 1), ("scaled", 9)):
        torch.testing.assert_close(collected.hessians[name], factor * 2 * flat.T @ flat / flat.shape[0])
    layer(xs[0])  # hooks are gone after the block
    assert collected.counts["layer"] == flat.shape[0]


# ------------------------------------------------------------------------------------- freeze(error_compensation=)


@pytest.fixture(scope="module")
def elastic(tiny_llama_dir):
    return elastic_model(tiny_llama_dir, num_samples=8, seq_len=16)


def test_freeze_with_error_compensation(elastic):
    data = ids(seed=4, batch=8, length=16)
    set_bits(elastic, 16)
    reference = logits(elastic, data)
    plain = freeze(elastic, bits=[2, 3, 4])
    compensated = freeze(elastic, bits=[2, 3, 4], error_compensation=data)
    assert get_bits(elastic) == 16  # the passes over the data leave the model's width as it was
    changed = 0
    for name, layer in frozen_linears(compensated).items():
        other = frozen_linears(plain)[name]
        for b in (3, 4):  # (which grid each row keeps: test_grid_search_keeps_each_rows_best_grid)
            changed += int(not torch.equal(layer.qweight[str(b)], other.qweight[str(b)]))
    assert changed > 0
    for name, layer in frozen_linears(compensated).items():  # 2 bits keep plain rounding (COMPENSATED_MIN_BITS)
        assert torch.equal(layer.qweight["2"], frozen_linears(plain)[name].qweight["2"])
    for b in (3, 4):
        plain.set_adapter(f"w{b}")
        compensated.set_adapter(f"w{b}")
        plain_error = (logits(plain, data) - reference).pow(2).mean()
        compensated_error = (logits(compensated, data) - reference).pow(2).mean()
        assert compensated_error < plain_error, (b, compensated_error, plain_error)


def test_freeze_error_compensation_chunks_and_round_trips(elastic, tmp_path):
    """A Hessian budget of one layer gives the same codes (one pass per layer); the result saves and reloads."""
    data = ids(seed=5, batch=4, length=16)
    kept = {name: [3] for name in quept_linears(elastic)}
    windows = {"num_samples": 4, "seq_len": 16}
    whole = dict(input_hessians(elastic, kept, data, **windows))
    chunked: dict[str, torch.Tensor] = {}
    for b, hessians in input_hessians(elastic, kept, data, budget_bytes=1, **windows):
        assert len(hessians) == 1 and b == 3
        chunked.update(hessians)
    assert chunked.keys() == whole[3].keys()
    for name, h in whole[3].items():
        torch.testing.assert_close(chunked[name], h)
    frozen = freeze(elastic, bits=[3], error_compensation=data)
    frozen.save_pretrained(tmp_path / "f")
    again = type(frozen).from_pretrained(tmp_path / "f")
    for name, layer in frozen_linears(again).items():
        assert torch.equal(layer.qweight["3"], frozen_linears(frozen)[name].qweight["3"])


def test_error_compensation_bits_choose_the_compensated_widths(elastic):
    data = ids(seed=4, batch=8, length=16)
    plain = freeze(elastic, bits=[3, 4], plans=[])
    every = freeze(elastic, bits=[3, 4], plans=[], error_compensation=data)
    only_3 = freeze(elastic, bits=[3, 4], plans=[], error_compensation=data, error_compensation_bits=[3])
    moved = 0
    for name, layer in frozen_linears(only_3).items():
        assert torch.equal(layer.qweight["3"], frozen_linears(every)[name].qweight["3"])
        assert torch.equal(layer.qweight["4"], frozen_linears(plain)[name].qweight["4"])  # W4: the elastic codes
        moved += not torch.equal(frozen_linears(every)[name].qweight["4"], layer.qweight["4"])
    assert moved > 0  # compensation does change W4 when asked, so the check above means something
    for bad in ([5], 4, ["3"]):
        with pytest.raises(ValueError, match=r"error_compensation_bits=.*kept bit-widths, \[3, 4\]"):
            freeze(elastic, bits=[3, 4], plans=[], error_compensation=data, error_compensation_bits=bad)
    with pytest.raises(ValueError, match="given with error_compensation data"):
        freeze(elastic, bits=[3, 4], plans=[], error_compensation_bits=[3])


def test_freeze_error_compensation_refuses_bad_data(elastic):
    with pytest.raises(ValueError, match="seq_len"):
        freeze(elastic, bits=[3], error_compensation=torch.zeros(1, 4, dtype=torch.long))
    assert quept_hf.quept_config(elastic).seq_len == 16


def test_cli_freeze_with_error_compensation(elastic, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quept_hf.cli import main as cli_main

    elastic.save_pretrained(tmp_path / "elastic")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.save_pretrained(tmp_path / "elastic")
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "frozen"
    argv = ["freeze", str(tmp_path / "elastic"), "--bits", "3", "--plans", "", "--out", str(out)]
    assert cli_main([*argv, "--error-compensation", str(text)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = freeze(elastic, bits=[3], plans=[], error_compensation=str(text), tokenizer=tokenizer)
    for name, layer in frozen_linears(loaded).items():
        assert torch.equal(layer.qweight["3"], frozen_linears(expected)[name].qweight["3"])
    with pytest.raises(SystemExit):  # argparse's error exit, naming the option
        cli_main([*argv[:-1], str(tmp_path / "again"), "--error-compensation", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit):
        cli_main([*argv[:-1], str(tmp_path / "again"), "--error-compensation-bits", "3"])
    assert cli_main([*argv[:-1], str(tmp_path / "only"), "--error-compensation", str(text), "--error-compensation-bits",
                     "3"]) == 0  # fmt: skip
    for name, layer in frozen_linears(AutoModelForCausalLM.from_pretrained(tmp_path / "only")).items():
        assert torch.equal(layer.qweight["3"], frozen_linears(expected)[name].qweight["3"])


@pytest.mark.parametrize("zero_point", ["float", "integer"])
def test_grid_search_holds_a_weight_already_on_a_coarser_grid(zero_point):
    """A 4-bit Q4_1-style weight frozen at 5 bits: the search's nested grid (the 4-bit step in 5-bit codes)
    reproduces it exactly, which neither the 5-bit min/max grid nor plain GPTQ on it does."""
    from quept_hf.packing.working import dequantize_codes

    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (8, 4, 32), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 15  # both ends present: the group's min/max is the 4-bit grid's
    d = 0.01 + 0.05 * torch.rand(8, 4, 1, generator=gen)
    weight = (d * codes - d * 15 * torch.rand(8, 4, 1, generator=gen)).reshape(8, 128)
    if zero_point == "integer":  # an integer zero point holds only blocks whose minimum is a multiple of the step
        weight = weight - weight.reshape(8, 4, 32).amin(-1).repeat_interleave(32, dim=1)
    x = torch.randn(256, 128, generator=gen)
    hessian = 2 * x.T @ x / 256
    logit = torch.full((8, 4), float("inf"))  # sigmoid(inf) = 1: the whole min/max range
    codes, scales, zeros = compensated_weight_codes(weight, hessian, 5, logit, logit, 32, zero_point, grid_search=True)
    exact = dequantize_codes(codes, scales, zeros, 32)
    assert torch.allclose(exact, weight, atol=1e-6)
    codes, scales, zeros = compensated_weight_codes(weight, hessian, 5, logit, logit, 32, zero_point)
    assert (dequantize_codes(codes, scales, zeros, 32) - weight).abs().max() > 1e-3
