"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa; all-MiniLM-L6-v2 is a BertModel).

Calibrated on token windows like a decoder (no padding, so no attention mask to capture); activations are
quantized per token as for LLMs. The pooler / classification head is pinned at 8 bits like a ViT head.
"""

from __future__ import annotations

from .registry import Architecture, register_architecture

BERT = register_architecture(
    Architecture(
        name="BERT-family encoder",
        model_types=("bert", "roberta", "xlm-roberta"),
        block_paths=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
        forward_kwargs=(),
        pinned_modules=("pooler.dense", "classifier"),
    )
)
