"""CUDA checks of the paths the CPU test suite cannot reach (run on a GPU machine):

    python benchmarks/gpu_check.py

1. Hadamard transform on CUDA (the fast_hadamard_transform kernel when it imports, else the PyTorch butterfly)
   against the CPU implementation, for SmolLM2 / LLaMA-2 sizes;
2. dense bit packing on CUDA against the CPU codec, every bit-width 2..8;
3. the calibration engine with blocks moved to CUDA one at a time (model kept on the CPU), compared with the
   same calibration on the CPU;
4. a packed (exported) model on CUDA against the fake-quant model on CUDA;
5. a frozen model (codes of every width, reloaded onto CUDA) at several widths against its CPU logits.
Prints one line per check and exits non-zero when one fails.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import quept_hf
from quept_hf.nn.hadamard import hadamard_transform
from quept_hf.packing.codec import pack, unpack

FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def check_hadamard() -> None:
    kernel = importlib.util.find_spec("fast_hadamard_transform") is not None
    for n in (576, 1536, 4096, 11008):
        x = torch.randn(64, n, generator=torch.Generator().manual_seed(n))
        cpu = hadamard_transform(x)
        gpu = hadamard_transform(x.cuda()).cpu()
        err = (cpu - gpu).abs().max().item()
        report(f"hadamard n={n}", err < 1e-3, f"max |cpu - cuda| = {err:.2e} (fast_hadamard_transform: {kernel})")


def check_packing() -> None:
    for bits in range(2, 9):
        codes = torch.randint(0, 2**bits, (96, 577), generator=torch.Generator().manual_seed(bits))
        same = torch.equal(pack(codes, bits), pack(codes.cuda(), bits).cpu())
        back = torch.equal(unpack(pack(codes.cuda(), bits), bits, 577).cpu(), codes.to(torch.uint8))
        report(f"packing {bits} bits", same and back, f"cuda pack == cpu pack: {same}, round trip: {back}")


def tiny_llama_dir() -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    folder = tempfile.mkdtemp()
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# The engine's option paths that touch tensors on the compute device: MB-ToMe vs separate streams, one lr per
# parameter kind vs per-bit step-scaled lrs, and AWQ-style smoothing (its grid search runs on the device too).
VARIANTS = {
    "mbtome": dict(token_merge="mbtome", lr_scaling="none", smoothing=False),
    "separate+step+smoothing": dict(token_merge="separate", lr_scaling="step", smoothing=True),
}


def calibrated(folder: str, ids: torch.Tensor, cuda: bool, variant: str = "mbtome") -> torch.nn.Module:
    settings = dict(VARIANTS[variant])
    config = quept_hf.QuEPTConfig(ranks=[4] * 4, group_size=16, smoothing=settings.pop("smoothing"))
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: cuda  # the engine picks its device from this
    try:
        quept_hf.calibrate(
            model, ids, epochs=2, num_samples=8, seq_len=32, batch_size=4, lr_lora=1e-4, lr_clip=0.1, **settings
        )
    finally:
        torch.cuda.is_available = available
    return model


def check_calibration(folder: str, variant: str) -> None:
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    on_cpu, on_cuda = calibrated(folder, ids, False, variant), calibrated(folder, ids, True, variant)
    devices = {p.device.type for p in on_cuda.parameters()}
    report(f"{variant}: calibration keeps the model on its device", devices == {"cpu"}, f"devices {devices}")
    x = ids[:4]
    for bits in (2, 4, 8):
        on_cpu.set_adapter(f"w{bits}")
        on_cuda.set_adapter(f"w{bits}")
        with torch.no_grad():
            a, b = on_cpu(x).logits, on_cuda(x).logits
        rel = ((a - b).norm() / a.norm()).item()
        report(f"{variant}: calibration cuda vs cpu w{bits}", rel < 5e-2, f"relative logit difference {rel:.2e}")


def check_packed(folder: str) -> None:
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    model = calibrated(folder, ids, True)
    out = tempfile.mkdtemp() + "/w3"
    quept_hf.export(model, 3, out)
    packed = AutoModelForCausalLM.from_pretrained(out).cuda()
    model.set_adapter("w3")
    model.cuda()
    with torch.no_grad():
        a, b = model(ids.cuda()).logits, packed(ids.cuda()).logits
    err = (a - b).abs().max().item()
    report("packed w3 on cuda vs fake-quant", err < 1e-3, f"max |logit difference| = {err:.2e}")


def check_frozen(folder: str) -> None:
    """The frozen model (codes of every width) on CUDA: each width against the CPU codes' logits, and a switch."""
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    model = calibrated(folder, ids, False)
    frozen = quept_hf.freeze(model)
    out = tempfile.mkdtemp() + "/frozen"
    frozen.save_pretrained(out)
    on_cuda = AutoModelForCausalLM.from_pretrained(out).cuda().eval()
    for bits in (2, 3, 4, 8):
        frozen.set_adapter(f"w{bits}")
        on_cuda.set_adapter(f"w{bits}")
        with torch.no_grad():
            a, b = frozen(ids).logits, on_cuda(ids.cuda()).logits.cpu()
        err = (a - b).abs().max().item()
        report(f"frozen w{bits} on cuda vs cpu codes", err < 1e-3, f"max |logit difference| = {err:.2e}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    folder = tiny_llama_dir()
    calibrations = [lambda v=v: check_calibration(folder, v) for v in VARIANTS]
    frozen_checks = (lambda: check_packed(folder), lambda: check_frozen(folder))
    for check in (check_hadamard, check_packing, *calibrations, *frozen_checks):
        try:
            check()
        except Exception as error:  # report every check, even after one breaks
            report(getattr(check, "__name__", "check"), False, f"{type(error).__name__}: {error}")
    print(f"{len(FAILURES)} failure(s): {FAILURES}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
