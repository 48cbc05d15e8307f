"""Peer quantization libraries on SmolLM2-135M through THEIR OWN APIs, against QuEPT's round-to-nearest.

    python benchmarks/peers_smollm2.py --quick    # 8 held-out windows (tens of minutes on 2 busy CPU cores)
    python benchmarks/peers_smollm2.py            # 40 windows, as benchmarks/calibrate_smollm2.py

Held-out perplexity (other Wikipedia articles than the calibration ones, quept_hf.assets.wikipedia_split) per
weight bit-width 2..8 that each library supports, no calibration data for the weights:
- QuEPT RTN: ``QuEPTConfig(mode="weight_only")`` + ``set_bits(model, b)`` (initial clipping, no calibration);
- HQQ: ``AutoHQQHFModel.quantize_model(model, BaseQuantizeConfig(nbits=b, group_size=g, axis=1))`` (its
  half-quadratic scale / zero optimiser, no data);
- quanto: ``optimum.quanto.quantize(model, weights=qintB)`` + ``freeze`` (min/max, symmetric absmax at 8 bits);
- W+A: quanto ``qintB`` weights + ``qint8`` activations (static per-tensor scales from ``Calibration()`` on
  calibration windows), and QuEPT RTN W8A8 (``mode="weight_activation"``: per-token dynamic activations,
  Hadamard rotation).
Group sizes follow QuEPT's defaults (128 for bits <= 3, per output channel above) where the peer allows it; the
``group`` column says what each peer really used ("HQQ g64": HQQ with groups that stay inside a row, see
``hqq_model``). lm_head (tied to the embeddings) stays float everywhere.
Install the peers with ``pip install --no-deps hqq optimum-quanto einops termcolor ninja`` (the ``peers`` extra
names them) so that pip keeps the CPU torch. A peer that cannot be imported or run is reported and skipped.
Prints the table and writes benchmarks/results/peers_smollm2[_quick].csv (and .png).
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import time

import _common as common
import torch

import quept_hf

BITS = range(2, 9)
QUEPT_GROUPS = quept_hf.QuEPTConfig(mode="weight_only").group_size  # {bits: 128 or -1 (per output channel)}


def parse_args():
    parser = common.parser(__doc__, quick="8 held-out windows, 4 activation calibration windows")
    parser.add_argument("--eval-windows", type=int, default=40, help="512-token held-out windows")
    parser.add_argument("--calib-windows", type=int, default=16, help="512-token windows for quanto's activations")
    return parser.parse_args()


def group_name(size: int | None) -> str:
    return "per-channel" if size in (None, -1) else f"g{size}"


# ------------------------------------------------------------------------------------------------ builders


def hqq_bits() -> list[int]:
    from hqq.core.quantize import Quantizer

    return [b for b in BITS if b in Quantizer.SUPPORTED_BITS]


def hqq_model(smol: common.SmolLM2, bits: int, group: int | None = None):
    """HQQ at QuEPT's group size (``group``: another one). HQQ groups the FLATTENED weight, so a group of 128 spans
    two rows where in_features=576 (QuEPT keeps groups inside a row); 64 divides every in_features here."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    group = group or (None if QUEPT_GROUPS[bits] == -1 else QUEPT_GROUPS[bits])
    model = smol.load()
    config = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float32, device="cpu")
    note = "groups of the flattened weight: some span two rows where in_features=576" if group == 128 else ""
    return model, group_name(group), note


def quanto_bits() -> list[int]:
    from optimum.quanto import qtypes

    return sorted(q.bits for name, q in qtypes.items() if name.startswith("qint") and q.bits in BITS)


def quanto_model(smol: common.SmolLM2, bits: int, calib: torch.Tensor | None = None):
    """qint``bits`` weights; with ``calib`` (windows of token ids) also qint8 activations calibrated on them."""
    from optimum.quanto import Calibration, QModuleMixin, freeze, qint8, qtypes, quantize

    model = smol.load()
    quantize(model, weights=qtypes[f"qint{bits}"], activations=None if calib is None else qint8, exclude="lm_head")
    if calib is not None:
        with Calibration(), torch.no_grad():
            for batch in calib.split(4):
                model(batch)
    freeze(model)
    sizes = sorted({m.weight_group_size for m in model.modules() if isinstance(m, QModuleMixin)}, key=str)
    group = "/".join(group_name(s) for s in sizes)
    forced = group != group_name(QUEPT_GROUPS[bits])
    note = f"group forced by quanto (QuEPT: {group_name(QUEPT_GROUPS[bits])})" if forced else ""
    if calib is not None:
        note = f"A8 static per-tensor, {len(calib)} calibration windows; {note}".rstrip("; ")
    return model, group, note


def quept_rtn(smol: common.SmolLM2, mode: str):
    model = smol.load(quept_hf.QuEPTConfig(mode=mode))

    def build(bits: int):
        quept_hf.set_bits(model, bits)
        note = "A8 dynamic per-token, Hadamard rotation" if mode == "weight_activation" else ""
        return model, group_name(quept_hf.quept_config(model).group_size[bits]), note

    return build


# ------------------------------------------------------------------------------------------------ the run


class Run:
    def __init__(self, args, smol: common.SmolLM2):
        self.args, self.smol, self.rows = args, smol, []

    def add(self, method: str, bits: int, build, activations: str = "") -> None:
        """``build()`` -> (model, group, note); timed as the quantization. A failure becomes a row saying so."""
        start = time.perf_counter()
        row = {"method": method, "bits": bits, "activations": activations}
        try:
            model, group, note = build()
            seconds = time.perf_counter() - start
            ppl = self.smol.perplexity(model, self.args.eval_windows)
            row.update(group=group, ppl=round(ppl, 4), quantize_s=round(seconds, 1), note=note)
        except Exception as error:  # report it and go on with the other rows
            row.update(group="", ppl="", quantize_s="", note=f"failed: {type(error).__name__}: {error}"[:300])
        self.rows.append(row)
        value = row["ppl"] if row["ppl"] == "" else f"{row['ppl']:.2f}"
        label = "float" if bits == 16 else f"W{bits}{activations}"
        print(f"  {method:<14} {label:<6} {row['group']:<12} ppl {value:>10}  {row['note']}", flush=True)
        gc.collect()

    def peer(self, name: str, module: str, add_rows) -> None:
        """Run ``add_rows()`` when ``module`` imports; otherwise one row saying why the peer is skipped."""
        try:
            importlib.import_module(module)
            version = importlib.metadata.version(name)
        except Exception as error:
            note = f"not usable here ({type(error).__name__}: {error}); pip install --no-deps {name}"
            print(f"{name}: {note}", flush=True)
            self.rows.append({"method": name, "bits": "", "activations": "", "note": note})
            return
        print(f"{name} {version}", flush=True)
        try:
            add_rows()
        except Exception as error:
            print(f"{name}: failed ({type(error).__name__}: {error}), skipped", flush=True)
            self.rows.append({"method": name, "bits": "", "activations": "", "note": f"failed: {error}"[:300]})


def calibration_windows(smol: common.SmolLM2, count: int) -> torch.Tensor:
    ids = smol.tokenizer("\n\n".join(smol.calib_texts), return_tensors="pt").input_ids[0]
    return ids[: count * 512].view(count, 512)


def main() -> None:
    args = common.setup(parse_args(), dict(eval_windows=8, calib_windows=4))
    start = time.perf_counter()
    smol = common.smollm2()
    run = Run(args, smol)
    print(f"SmolLM2-135M, held-out perplexity on {args.eval_windows} x 512 tokens, torch {torch.__version__}")
    run.add("float", 16, lambda: (smol.load(), "-", ""))

    def quept_rows():  # one elastic model for every bit-width, freed on return
        build = quept_rtn(smol, "weight_only")
        for bits in BITS:
            run.add("QuEPT RTN", bits, lambda b=bits: build(b))

    def hqq_rows():
        for bits in hqq_bits():
            run.add("HQQ", bits, lambda b=bits: hqq_model(smol, b))
        for bits in (b for b in hqq_bits() if QUEPT_GROUPS[b] != -1):  # the same with groups inside rows
            run.add("HQQ g64", bits, lambda b=bits: hqq_model(smol, b, 64))

    def quanto_rows():
        for bits in quanto_bits():
            run.add("quanto", bits, lambda b=bits: quanto_model(smol, b))
        calib = calibration_windows(smol, args.calib_windows)
        for bits in quanto_bits():
            run.add("quanto A8", bits, lambda b=bits: quanto_model(smol, b, calib), activations="A8")

    quept_rows()
    run.peer("hqq", "hqq.models.hf.base", hqq_rows)
    run.peer("optimum-quanto", "optimum.quanto", quanto_rows)
    run.add("QuEPT RTN WA", 8, lambda: quept_rtn(smol, "weight_activation")(8), activations="A8")
    report(run.rows, args, time.perf_counter() - start)


def report(rows: list[dict], args, seconds: float) -> None:
    measured = [r for r in rows if r["bits"] != ""]
    methods = list(dict.fromkeys(r["method"] for r in measured if r["method"] != "float"))
    cell = {(r["method"], r["bits"]): r for r in measured}
    floats = {r["method"]: r["ppl"] for r in measured if r["method"] == "float"}
    for key, title in (("ppl", "held-out perplexity"), ("group", "group size used")):
        print(f"\n{title} (W = weight bits; A8 = 8-bit activations; - = not supported by the library)")
        print(f"{'bits':>6} | " + " | ".join(f"{m:>14}" for m in methods))
        if key == "ppl":
            print(f"{'float':>6} | " + " | ".join(f"{floats['float']:>14.2f}" for _ in methods))
        for bits in BITS:
            values = [cell[m, bits][key] or "failed" if (m, bits) in cell else "-" for m in methods]
            text = [f"{v:>14.2f}" if isinstance(v, float) else f"{v!s:>14}" for v in values]
            print(f"{f'W{bits}':>6} | " + " | ".join(text))
    for row in (r for r in rows if r.get("note")):
        bits = f"W{row['bits']}{row['activations']}" if row["bits"] else ""
        print(f"note {row['method']} {bits}: {row['note']}")
    print(f"\nwall time {seconds / 60:.1f} min, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    plot = common.Plot(
        "bits", "ppl", series="method", log=True, ylabel="held-out perplexity", reference=floats,
        title=f"SmolLM2-135M: QuEPT RTN vs HQQ vs quanto ({args.eval_windows} x 512 tokens)",
        where=lambda row: row["method"] != "float" and row.get("group"),
    )  # fmt: skip
    common.write_results(f"peers_smollm2{'_quick' if args.quick else ''}", rows, plot)


if __name__ == "__main__":
    main()
