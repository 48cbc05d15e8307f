"""Error-compensated rounding (GPTQ) of a calibrated layer: the same grid, better codes.

QuEPT's calibration learns, per bit-width ``b``, a weight update ``ΔW_b`` and clipping; plain freezing then rounds
``W + ΔW_b`` to the nearest point of that grid. Rounding each weight independently ignores that the errors of a
row add up in the layer's output. GPTQ (Frantar et al., 2023) rounds one input column at a time and spreads each
column's rounding error over the columns not rounded yet, weighted by the inverse of the layer's input Hessian
``H = 2 X^T X / n``, which minimises ``||W X - Q X||`` far better than rounding to nearest at 2-4 bits.

Here the grid (scales and zero points of every group) is the CALIBRATED one, computed once from ``W + ΔW_b``
before any column moves ("static groups"), so codes, scales and zero points keep QuEPT's format exactly and every
exporter stores them unchanged: compensation costs no storage and no run-time work.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.functional import _group_view, fake_quantize_weight, grid_codes, group_width, weight_qparams

__all__ = ["InputHessians", "compensated_weight_codes"]

DAMPING = 0.01  # of the mean Hessian diagonal, added to it: GPTQ's default, keeps the Cholesky factor stable
SHRINK = torch.linspace(1.0, 0.75, 11).tolist()  # clipping factors `searched_clipping` tries (both ends)
BLOCK_COLUMNS = 128  # columns updated together (lazy batch updates); the result does not depend on it


@torch.no_grad()
def compensated_weight_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    upper_logit: torch.Tensor,
    lower_logit: torch.Tensor,
    group_size: int,
    zero_point: str = "integer",
    *,
    act_order: bool = True,
    damping: float = DAMPING,
    target: torch.Tensor | None = None,
    grid_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (out, in) uint8 and the (out, groups) scale and zero point, as `quantize_weight_codes` returns them.

    ``hessian`` is the (in, in) input Hessian of the layer (`InputHessians`); ``act_order`` rounds the columns of
    largest Hessian diagonal first (GPTQ's "act-order": the error then lands on the columns that matter least).
    ``target``: the weight whose outputs the codes should reproduce, when it is not ``weight`` (whose grid they
    take): e.g. the float weight, for a grid learned on ``W + ΔW``.
    ``grid_search``: also run GPTQ on the min/max grid of ``target`` and on its importance-searched clipping
    (`searched_clipping`), and keep, ROW by row, the grid whose codes reproduce the row's outputs best
    (``e H e^T``, exact per row: GPTQ treats rows independently). Scales and zero points stay one pair per
    (row, group), so the format is unchanged, and the kept grid's scales are then refit to the chosen codes
    (`refit_scales`, least squares on ``e H e^T``). For an asymmetric grid the search
    also tries the min/max grid at the step of ``bits - 1`` (`nested_grid`): a weight that already lies on a
    ``bits - 1`` grid (a model distributed quantized, e.g. SmolLM2 from a Q4_1 GGUF) is held by it EXACTLY, where
    the finer ``bits`` grid of the same range re-rounds every weight; for other weights it loses and is not kept.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; the layer needs ({in_features}, {in_features})")
    target = (weight if target is None else target).detach().float()
    grids = [weight_qparams(weight, bits, upper_logit, lower_logit, group_size, zero_point)]  # plain rounding's
    if grid_search:
        full = torch.full_like(upper_logit, float("inf"))  # sigmoid(inf) = 1: the whole min/max range
        grids.append(weight_qparams(target, bits, full, full, group_size, zero_point))
        searched = searched_clipping(target, hessian, bits, group_size, zero_point)
        grids.append(weight_qparams(target, bits, searched, searched, group_size, zero_point))
        if bits > 2 and zero_point != "symmetric":  # a symmetric grid's zero point is fixed by ``bits``
            grids.append(nested_grid(target, bits, full, group_size, zero_point))
    column_group = torch.arange(in_features) // group_width(in_features, group_size)
    col_scale = torch.cat([scale[:, column_group, 0] for scale, _ in grids]).float()  # (rows, in), rows stacked
    col_zero = torch.cat([zero[:, column_group, 0] for _, zero in grids]).float()
    stacked = target.repeat(len(grids), 1)  # one copy of the target per candidate grid
    codes = _gptq(stacked, hessian, col_scale, col_zero, bits, zero_point == "float", act_order, damping)
    scale, zero = (torch.cat([g[i] for g in grids]).squeeze(-1) for i in (0, 1))
    if len(grids) > 1:
        error = stacked - col_scale * (codes - col_zero)
        row_error = ((error @ hessian.float()) * error).sum(dim=1).reshape(len(grids), out_features)
        rows = torch.arange(out_features) + out_features * row_error.argmin(dim=0)  # each row's better grid
        codes, scale, zero = codes[rows], scale[rows], zero[rows]
        scale = refit_scales(target, codes, scale, zero, hessian, group_size)
    return codes.to(torch.uint8), scale, zero


def refit_scales(
    target: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    sweeps: int = 2,
) -> torch.Tensor:
    """Scales (out, groups) that reproduce ``target``'s outputs better with the codes and zero points as they are.

    With the codes fixed, each row's output error ``e H e^T`` (``e = w - s_g (c - z)`` per group) is a quadratic in
    the group scales: exact coordinate descent over the groups (``sweeps`` passes) can only lower it. llama.cpp's
    importance-matrix quantizer refits each block's scale by weighted least squares after rounding the same way;
    a GPTQ grid, fixed before the column loop, cannot move by itself. A row whose refit would make a scale
    non-positive keeps its scales (exporters assume ``s > 0``).
    """
    in_features = target.shape[1]
    width = group_width(in_features, group_size)
    column_group = torch.arange(in_features) // width
    h = hessian.float()
    units = codes.float() - zero.float()[:, column_group]  # (out, in): c - z
    refit = scale.float().clone()
    residual = target.float() - refit[:, column_group] * units
    h_residual = residual @ h
    for _ in range(sweeps):
        for group in range(refit.shape[1]):
            cols = slice(group * width, min((group + 1) * width, in_features))
            unit = units[:, cols]
            curvature = ((unit @ h[cols, cols]) * unit).sum(dim=1)
            step = torch.where(curvature > 0, (unit * h_residual[:, cols]).sum(dim=1) / curvature, 0.0)
            refit[:, group] += step
            h_residual -= (step.unsqueeze(1) * unit) @ h[cols, :]
    keep = (refit > 0).all(dim=1, keepdim=True)
    return torch.where(keep, refit, scale.float()).to(scale.dtype)


def searched_clipping(
    target: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, zero_point: str
) -> torch.Tensor:
    """Clipping logits (out, groups) of ``target``: per group, the factor of `SHRINK` (both ends) whose plain
    rounding has the smallest importance-weighted error ``sum diag(H) (w - Q(w))^2``: llama.cpp's importance-matrix
    scale search (its imatrix IS the mean squared input of each column, the Hessian's diagonal), per QuEPT group.
    A scale that spares the heavy columns is one GPTQ's fixed grid cannot find by itself."""
    importance = _group_view(torch.diag(hessian).float().unsqueeze(0), group_size)
    groups = importance.shape[1]
    best_error = torch.full((target.shape[0], groups), float("inf"))
    best = torch.full((target.shape[0], groups), float("inf"))
    for factor in SHRINK:
        logit = torch.full_like(best, float("inf") if factor >= 1 else float(torch.logit(torch.tensor(factor))))
        error = _group_view(
            target - fake_quantize_weight(target, bits, logit, logit, group_size, zero_point), group_size
        )
        weighted = (error**2 * importance).sum(dim=-1)
        better = weighted < best_error
        best_error, best = torch.where(better, weighted, best_error), torch.where(better, logit, best)
    return best


def nested_grid(
    target: torch.Tensor, bits: int, full: torch.Tensor, group_size: int, zero_point: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The min/max grid of ``bits - 1`` (its scale and zero point) for ``bits``-wide codes: the lower half of
    the codes spans the group's range on the coarser grid."""
    return weight_qparams(target, bits - 1, full, full, group_size, zero_point)


def _gptq(
    work: torch.Tensor,
    hessian: torch.Tensor,
    col_scale: torch.Tensor,
    col_zero: torch.Tensor,
    bits: int,
    float_zero: bool,
    act_order: bool,
    damping: float,
) -> torch.Tensor:
    """GPTQ's column loop on ``work`` (rows, in) with a fixed per-column grid: the codes, as float (rows, in)."""
    rows, in_features = work.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    # a column no calibration input reached is decoupled from the others (zero off-diagonal): plain rounding
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features)
    work, h = work[:, order], h[order][:, order]  # advanced indexing copies: the caller's tensor stays
    col_scale, col_zero = col_scale[:, order], col_zero[:, order]
    inverse = _upper_inverse_cholesky(h, damping)
    codes = torch.empty_like(work)
    for start in range(0, in_features, BLOCK_COLUMNS):
        end = min(start + BLOCK_COLUMNS, in_features)
        block, errors = work[:, start:end].clone(), torch.empty(rows, end - start)
        block_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            column, s, z = block[:, i], col_scale[:, start + i], col_zero[:, start + i]
            q = grid_codes(column / s, z, bits, float_zero)
            codes[:, start + i] = q
            error = (column - s * (q - z)) / block_inverse[i, i]
            block[:, i:] -= error.unsqueeze(1) * block_inverse[i, i:].unsqueeze(0)
            errors[:, i] = error
        work[:, end:] -= errors @ inverse[start:end, end:]
    codes[:, order] = codes.clone()
    return codes


def _upper_inverse_cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping·mean(diag H)·I)^-1``: GPTQ's row-wise error propagation weights."""
    h = h + damping * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    factor = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


class InputHessians:
    """Accumulate ``H = 2 X^T X / n`` of what each named layer's weight multiplies, over forward passes.

    ``inputs(layer, x)`` maps a layer's call input to what its matmul sees (e.g. `QuEPTLinear.quantize_input`:
    rotation and activation quantization applied). Use as a context manager around the calibration forwards.
    """

    def __init__(self, layers: dict[str, nn.Module], inputs=lambda layer, x: x):
        self.layers, self.inputs = layers, inputs
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list = []
        self._last: tuple | None = None  # (input tensor, X^T X, rows) of the last call, shared by its siblings

    def __enter__(self) -> InputHessians:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self._last = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def accumulate(layer: nn.Module, args: tuple) -> None:
            x = self.inputs(layer, args[0])
            if x is args[0] and self._last is not None and self._last[0] is x:
                update, rows = self._last[1:]  # q/k/v (gate/up) read the same tensor: one product for all
            else:
                flat = x.detach().float().reshape(-1, x.shape[-1])
                update, rows = flat.T @ flat, flat.shape[0]
                self._last = (x, update, rows) if x is args[0] else None
            seen = self.counts.get(name, 0)
            total = seen + rows
            previous = self.hessians.get(name)
            scaled = update * (2.0 / total)
            self.hessians[name] = scaled if previous is None else previous * (seen / total) + scaled
            self.counts[name] = total

        return accumulate
