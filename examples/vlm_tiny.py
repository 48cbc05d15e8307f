"""A vision-language model (LLaVA): calibrate on image-text pairs, switch bits, generate, save and reload.

    python examples/vlm_tiny.py --quick      # 1 epoch (well under a minute)
    python examples/vlm_tiny.py              # 4 epochs

No vision-language weights install offline, so this builds a TINY, randomly initialised LLaVA from a config
(CLIP vision tower + LLaMA language model) with a real processor: CLIP image preprocessing and SmolLM2's
tokenizer with an ``<image>`` placeholder. Its answers are therefore random words; everything else is what you
would do with ``AutoModelForImageTextToText.from_pretrained("llava-hf/...")`` and its ``AutoProcessor``:

1. ``QuEPTConfig(dataset=[(image, text), ...], processor=processor)``: the language model is elastic (here the
   vision tower too, ``quantize_vision_tower=True``), the multimodal projector stays in float;
2. ``model.set_adapter("w3")`` switches both; per bit-width: distance of the logits from the float model's
   and a greedy answer;
3. ``save_pretrained`` -> ``from_pretrained``: the reloaded model must give bit-identical logits and tokens.
"""

from __future__ import annotations

import tempfile

import _common
import torch
import transformers as T

import quept_hf  # registers quantization method "quept": import it BEFORE from_pretrained

BITS = [2, 3, 4, 5, 6, 7, 8]
IMAGE_SIZE, PATCH = 64, 16
QUESTIONS = ["What is in this photo?", "Describe the picture.", "What colour is the main object?", "Where is this?"]


def tiny_llava(folder: str) -> T.LlavaProcessor:
    """Save a seeded random LLaVA to ``folder``; returns its processor (the tokenizer gets an ``<image>`` token)."""
    tokenizer = T.AutoTokenizer.from_pretrained(_common.smollm2_folder())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = T.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = T.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",  # drop CLIP's CLS token ...
        num_additional_image_tokens=1,  # ... which the processor must know to count image tokens
    )
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**small, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=T.LlamaConfig(**small, vocab_size=len(tokenizer), num_key_value_heads=2),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    T.LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return processor


@torch.no_grad()
def run(model, inputs: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt and the greedy continuation."""
    return model(**inputs).logits, _common.greedy(model, inputs, new_tokens)


def text(processor, tokens: torch.Tensor) -> str:
    return repr(" ".join(processor.decode(tokens, skip_special_tokens=True).split()))


def main() -> None:
    cli = _common.parser(__doc__)
    cli.add_argument("--epochs", type=int, default=4)
    cli.add_argument("--num-samples", type=int, default=8, help="calibration image-text pairs (default 8)")
    cli.add_argument("--new-tokens", type=int, default=6)
    args = _common.setup(cli, {"epochs": 1})
    photos = _common.photos()
    # Calibration data: (PIL image, text) pairs; the processor adds the image placeholder to each text.
    pairs = [(photo, QUESTIONS[i % len(QUESTIONS)]) for i, photo in enumerate(photos[: args.num_samples])]

    with tempfile.TemporaryDirectory() as tmp:
        processor = tiny_llava(f"{tmp}/float")
        prompt = processor(images=photos[-1:], text=["<image>\nWhat is in this photo?"], return_tensors="pt")
        float_model = T.AutoModelForImageTextToText.from_pretrained(f"{tmp}/float").eval()
        float_logits, float_tokens = run(float_model, prompt, args.new_tokens)

        config = quept_hf.QuEPTConfig(
            mode="weight_only",
            bits=BITS,
            ranks=[4] * 4,
            group_size=32,  # columns per scale (the default 128 would span the whole row of these 64-wide layers)
            dataset=pairs,
            processor=processor,
            quantize_vision_tower=True,
            num_samples=args.num_samples,
            batch_size=2,
            epochs=args.epochs,
            lr_lora=1e-5,  # tiny random layers: the tests' learning rates
            lr_clip=0.1,
            seed=args.seed,
        )
        with _common.timed("from_pretrained + calibration (vision tower, then language model)"):
            model = T.AutoModelForImageTextToText.from_pretrained(f"{tmp}/float", quantization_config=config).eval()

        before = {}
        for b in BITS:
            model.set_adapter(f"w{b}")
            before[b] = run(model, prompt, args.new_tokens)
        model.save_pretrained(f"{tmp}/elastic")
        processor.save_pretrained(f"{tmp}/elastic")
        restored = T.AutoModelForImageTextToText.from_pretrained(f"{tmp}/elastic").eval()
        rows = [["float32", "0", text(processor, float_tokens), "-"]]
        for b in BITS:
            restored.set_adapter(f"w{b}")
            logits, tokens = run(restored, prompt, args.new_tokens)
            same = torch.equal(logits, before[b][0]) and torch.equal(tokens, before[b][1])
            error = (before[b][0] - float_logits).abs().mean().item()
            rows.append([f"W{b}", f"{error:.5f}", text(processor, tokens), same])
    _common.table(
        f"Tiny random LLaVA ({type(model).__name__}), weight-only, language model + vision tower, "
        f"{args.epochs} epoch(s) on {len(pairs)} image-text pairs",
        ["bits", "mean abs logit error vs float", "greedy answer (random weights)", "reload bit-identical"],
        rows,
    )


if __name__ == "__main__":
    main()
