"""Publish an elastic model to the Hugging Face Hub and load every bit-width back from it.

    python examples/hub_roundtrip.py --quick                       # against a local test Hub (no network)
    HF_TOKEN=hf_... python examples/hub_roundtrip.py --repo you/minilm-quept   # the real Hub

all-MiniLM-L6-v2 (a real BERT sentence encoder) is calibrated once for 2..8 bits; its quality per bit-width
(cosine similarity of sentence embeddings to the float model's, on held-out Wikipedia sentences) is recorded
with ``quept_hf.hub.record_evaluation``, so the model card gets a table and a quality-vs-bits plot. Then:

1. ``model.push_to_hub(repo)``: ONE commit with the float weights, every bit-width's clipping, the MB-CLoRA
   adapter, bit-switch metadata in ``config.json``, the model card and the plot;
2. ``quept_hf.hub.list_bit_widths(repo)`` reads what the repo switches between from ``config.json`` alone;
3. ``AutoModel.from_pretrained(repo)`` (after ``import quept_hf``) and ``set_adapter`` to each bit-width: the
   embeddings must be bit-identical to the model that was pushed.

Without ``--repo`` everything runs against ``tests/hub_server.py``, a local server that speaks the Hub's HTTP
API to the real ``huggingface_hub`` client (``tests/conftest_hub.py`` points the client at it).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

import _common
import torch
import torch.nn.functional as F
from huggingface_hub import list_repo_files
from transformers import AutoModel, AutoTokenizer

import quept_hf  # registers quantization method "quept": import it BEFORE from_pretrained

BITS = [2, 3, 4, 5, 6, 7, 8]
LOCAL_REPO = "me/all-minilm-l6-v2-quept"


def sentences(texts: list[str], count: int) -> list[str]:
    """Plain prose sentences (40..300 characters) of the held-out articles."""
    found = (s.strip() for text in texts for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in found if 40 <= len(s) <= 300 and s[0].isupper() and "|" not in s][:count]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states: the sentence-transformers recipe of this model."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def local_hub(stack: contextlib.ExitStack) -> str:
    """Start the local test Hub and point huggingface_hub / transformers at it (undone when ``stack`` closes)."""
    import pytest

    sys.path.insert(0, str(_common.ROOT))
    from tests.conftest_hub import point_hf_clients_at
    from tests.hub_server import LocalHub

    hub = stack.enter_context(LocalHub())
    patches = stack.enter_context(pytest.MonkeyPatch.context())
    point_hf_clients_at(patches, hub.url, Path(stack.enter_context(tempfile.TemporaryDirectory())) / "hf_home")
    return hub.url


def main() -> None:
    cli = _common.parser(__doc__)
    cli.add_argument("--repo", default=None, help="a real Hub repo id (needs HF_TOKEN); default: a local test Hub")
    cli.add_argument("--private", action="store_true", help="create the real Hub repo as private")
    cli.add_argument("--num-samples", type=int, default=32, help="calibration windows (default 32)")
    cli.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window (default 128)")
    cli.add_argument("--epochs", type=int, default=2)
    cli.add_argument("--sentences", type=int, default=64, help="held-out sentences for the quality column")
    args = _common.setup(cli, {"num_samples": 4, "seq_len": 64, "epochs": 1, "sentences": 16})
    if args.repo and not os.environ.get("HF_TOKEN"):
        raise SystemExit("--repo pushes to the real Hub: set HF_TOKEN (a write token) first")

    calib_texts, eval_texts = _common.wikipedia()
    probe = sentences(eval_texts, args.sentences)
    source = _common.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    reference = embed(AutoModel.from_pretrained(source).eval(), tokenizer, probe)

    config = quept_hf.QuEPTConfig(
        mode="weight_only", bits=BITS, ranks=[8] * 4, dataset=calib_texts, tokenizer=tokenizer,
        num_samples=args.num_samples, seq_len=args.seq_len, epochs=args.epochs, batch_size=4, seed=args.seed,
    )  # fmt: skip
    with _common.timed("from_pretrained + calibration"):
        model = AutoModel.from_pretrained(source, quantization_config=config).eval()
    adapters = [f"w{b}" for b in BITS]
    pushed = {}
    for name in adapters:
        model.set_adapter(name)
        pushed[name] = embed(model, tokenizer, probe)
    cosine = {name: (e * reference).sum(-1).mean().item() for name, e in pushed.items()}
    # Recorded quality goes into config.json, the card's table and its plot (higher is better here).
    quept_hf.hub.record_evaluation(
        model, {**cosine, "float": 1.0}, "cosine_to_float", dataset=f"{len(probe)} held-out Wikipedia sentences"
    )

    with contextlib.ExitStack() as stack:
        where = "the Hugging Face Hub" if args.repo else f"the local test Hub at {local_hub(stack)}"
        repo = args.repo or LOCAL_REPO
        with _common.timed(f"push_to_hub({repo!r}) to {where}"):
            commit = model.push_to_hub(repo, private=args.private or None)
            tokenizer.push_to_hub(repo)
        print(f"pushed commit {commit.oid[:10]}")
        metadata = quept_hf.hub.list_bit_widths(repo)  # config.json only: no weights downloaded
        with _common.timed("from_pretrained(repo)"):
            restored = AutoModel.from_pretrained(repo).eval()
        rows = []
        for name in adapters:
            restored.set_adapter(name)
            same = torch.equal(embed(restored, tokenizer, probe), pushed[name])
            info = metadata["adapters"][name]
            size = f"{info['size_bytes'] / 2**20:.1f}"
            rows.append([name, info["weight_bits"], info["rank"], size, f"{cosine[name]:.4f}", same])
        files = list_repo_files(repo)
    _common.table(
        f"all-MiniLM-L6-v2 elastic model on {where}: {repo} ({len(files)} files)",
        ["adapter", "weight bits", "rank", "packed MiB", "cosine to float", "reload bit-identical"],
        rows,
    )
    print("files:", ", ".join(sorted(files)))


if __name__ == "__main__":
    main()
