"""quept_hf.evaluation.perplexity against a manual token-by-token NLL computation on the tiny LLaMA."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quept_hf.evaluation import perplexity


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(0)
    words = ["quant", "elastic", "bits", "model", "layer", "scale", "group", "token", "the", "a"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) for _ in range(12)]


def manual_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int) -> float:
    """The guide's loop, one window at a time, summing -log p(token | window prefix) token by token."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        first_scored = max(end - (end - prev_end), begin + 1)  # masked context; the first token has no prefix
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids[None, begin:end]).logits[0].double(), dim=-1)
        for pos in range(first_scored, end):
            nll -= float(log_probs[pos - begin - 1, ids[pos]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)


def token_ids(tokenizer, texts) -> torch.Tensor:
    return tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]


@pytest.mark.parametrize(("seq_len", "stride"), [(64, None), (64, 64), (64, 16), (50, 37)])
def test_matches_manual_nll(model_and_tokenizer, texts, seq_len, stride):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, texts)
    assert len(ids) > 5 * seq_len and len(ids) % seq_len != 0  # several windows and a shorter last one
    expected = manual_perplexity(model, ids, seq_len, stride or seq_len)
    got = perplexity(model, texts, tokenizer, seq_len=seq_len, stride=stride, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)


def test_single_window_equals_transformers_loss(model_and_tokenizer, texts):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, texts[:1])
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    got = perplexity(model, texts[:1], tokenizer, seq_len=len(ids))
    assert got == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_batch_size_does_not_change_the_result(model_and_tokenizer, texts):
    model, tokenizer = model_and_tokenizer
    results = [perplexity(model, texts, tokenizer, seq_len=32, batch_size=b) for b in (1, 2, 5, 100)]
    assert max(results) == pytest.approx(min(results), rel=1e-5)


def test_max_windows_spreads_over_the_text(model_and_tokenizer, texts):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, texts)
    n_windows = -(-len(ids) // 32)
    assert perplexity(model, texts, tokenizer, seq_len=32, max_windows=n_windows + 5) == pytest.approx(
        perplexity(model, texts, tokenizer, seq_len=32)
    )
    # Two windows out of n: the first and the one halfway through the text.
    nll, count = 0.0, 0
    for begin in (0, (n_windows // 2) * 32):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids[None, begin : begin + 32]).logits[0].double(), -1)
        window = ids[begin : begin + 32]
        nll -= float(log_probs[:-1].gather(1, window[1:, None]).sum())
        count += len(window) - 1
    got = perplexity(model, texts, tokenizer, seq_len=32, max_windows=2)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_peft_model_and_training_mode_are_handled(model_and_tokenizer, texts):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = model_and_tokenizer
    expected = perplexity(model, texts, tokenizer, seq_len=64)
    fresh = AutoModelForCausalLM.from_pretrained(model.name_or_path)
    peft_model = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: no change
    peft_model.train()
    assert perplexity(peft_model, texts, tokenizer, seq_len=64) == pytest.approx(expected, rel=1e-6)
    assert peft_model.training  # the previous mode is restored


def test_bad_arguments(model_and_tokenizer, texts):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, texts, tokenizer, seq_len=32, stride=64)
    with pytest.raises(ValueError, match="no token to score"):
        perplexity(model, ["a"], tokenizer, seq_len=32)
