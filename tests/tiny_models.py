"""Tiny randomly initialised models of every architecture family quept_hf supports, with matching inputs.

Shared by tests/test_architectures.py and benchmarks/vlm_roundtrip.py. Every builder is seeded and returns a
`Tiny`: the float model saved to a folder, the Auto class to load it with, calibration data, a processor, and
inputs for evaluation. Sizes are the smallest the architectures accept, so a full quantize-calibrate-switch-
save cycle runs in a second or two on one CPU thread.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers as T
from PIL import Image

IMAGE_SIZE = 32
VOCAB = 200
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMAGE_SIZE)
CAPTIONS = [
    "a cat on a mat",
    "two dogs play in the park",
    "red car",
    "the sky at night, full of stars",
    "a bowl of soup",
    "an old bridge over a river",
    "children on bicycles",
    "snow on the mountains",
]


@dataclass
class Tiny:
    """A tiny float model on disk and everything needed to quantize, calibrate and evaluate it."""

    name: str
    folder: str
    auto_class: Any
    calibration: Any  # what QuEPTConfig(dataset=...) gets
    inputs: dict[str, torch.Tensor]  # evaluation inputs for model(**inputs)
    processor: Any = None
    config_kwargs: dict = field(default_factory=dict)  # extra QuEPTConfig fields (processor=..., ...)

    def load(self, **config: Any) -> torch.nn.Module:
        """The model, quantized with QuEPTConfig(**config) when given, in eval mode."""
        import quept_hf

        kwargs = {}
        if config:
            kwargs["quantization_config"] = quept_hf.QuEPTConfig(**{**self.config_kwargs, **config})
        return self.auto_class.from_pretrained(self.folder, **kwargs).eval()


def images(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[Image.Image]:
    """Smooth random RGB images (low-frequency noise looks more like photos than white noise does)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        out.append(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    return out


def char_tokenizer() -> T.PreTrainedTokenizerFast:
    """A character-level tokenizer with the image placeholders of LLaVA and Qwen2-VL as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    return tokenizer


class _ImagesOnly:
    """transformers 5.23 looks up the video processor's base class even for ``video_processor=None``, which
    fails without torchvision: the tiny processors handle images only, so skip that check."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and "video" in argument_name:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def _images_only(cls):
    return type(cls.__name__, (_ImagesOnly, cls), {})


def _save(model: torch.nn.Module, tmp_path, name: str) -> str:
    folder = tmp_path / name
    model.save_pretrained(folder)
    return str(folder)


def _pixels(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- builders


def vit(tmp_path, kind: str = "vit") -> Tiny:
    """ViT / DeiT / DINOv2 / Swin classifiers (DINOv2 as the backbone, like the real checkpoint)."""
    torch.manual_seed(0)
    if kind == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**_VIT, patch_size=8, num_labels=5))
    elif kind == "deit":
        model = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**_VIT, patch_size=8, num_labels=5))
    elif kind == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(**{**_VIT, "intermediate_size": None}, patch_size=8, mlp_ratio=2))
    elif kind == "swin":
        config = T.SwinConfig(
            image_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=4
        )
        config.num_labels = 5
        model = T.SwinForImageClassification(config)
    else:
        raise ValueError(kind)
    auto = T.AutoModel if kind == "dinov2" else T.AutoModelForImageClassification
    return Tiny(kind, _save(model.eval(), tmp_path, kind), auto, _pixels(16, 1), {"pixel_values": _pixels(4, 2)})


def bert(tmp_path) -> Tiny:
    torch.manual_seed(0)
    config = T.BertConfig(**{**_TEXT, "vocab_size": 128}, max_position_embeddings=64)
    model = T.BertModel(config).eval()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(2))}
    return Tiny("bert", _save(model, tmp_path, "bert"), T.AutoModel, ids, inputs, config_kwargs={"seq_len": 32})


def _clip_image_processor() -> T.CLIPImageProcessorPil:
    size = {"shortest_edge": IMAGE_SIZE}
    return T.CLIPImageProcessorPil(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def llava(tmp_path) -> Tiny:
    tokenizer = char_tokenizer()
    vision = T.CLIPVisionConfig(**_VIT, patch_size=8)
    config = T.LlavaConfig(
        vision_config=vision,
        text_config=T.LlamaConfig(**_TEXT, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    processor = T.LlavaProcessor(
        image_processor=_clip_image_processor(),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    return _vlm("llava", T.LlavaForConditionalGeneration(config), processor, tmp_path, T.AutoModelForImageTextToText)


def llava_onevision(tmp_path) -> Tiny:
    tokenizer = char_tokenizer()
    vision = T.SiglipVisionConfig(**_VIT, patch_size=8)
    config = T.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=T.Qwen2Config(**_TEXT, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
    )
    image_processor = T.LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]]
    )
    processor = _images_only(T.LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(IMAGE_SIZE // 8) ** 2,
        vision_feature_select_strategy="full",
    )
    model = T.LlavaOnevisionForConditionalGeneration(config)
    return _vlm("llava_onevision", model, processor, tmp_path, T.AutoModelForImageTextToText)


QWEN_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}"
)


def qwen2_vl(tmp_path) -> Tiny:
    tokenizer = char_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIALS[4:]}
    config = T.Qwen2VLConfig(
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2
        ),
        text_config=dict(
            **_TEXT,
            num_key_value_heads=1,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<image>"],  # unused; must differ from the image token
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = T.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    processor = _images_only(T.Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE
    )
    model = T.Qwen2VLForConditionalGeneration(config)
    return _vlm("qwen2_vl", model, processor, tmp_path, T.AutoModelForImageTextToText, batch_size=1)


def _vlm(name: str, model, processor, tmp_path, auto, batch_size: int = 2) -> Tiny:
    torch.manual_seed(0)
    model = type(model)(model.config).eval()  # re-initialise under the fixed seed
    pairs = list(zip(images(len(CAPTIONS), seed=1), CAPTIONS, strict=True))
    from quept_hf.calibration.data import _prompt

    # Evaluation / generation inputs the usual way: left padding and an attention mask.
    prompts = [_prompt(processor, text) for text in CAPTIONS[:2]]
    inputs = processor(images=images(2, seed=2), text=prompts, padding=True, padding_side="left", return_tensors="pt")
    folder = _save(model, tmp_path, name)
    extra = {"processor": processor, "batch_size": batch_size}
    return Tiny(name, folder, auto, pairs, dict(inputs), processor, extra)


BUILDERS = {
    "bert": bert,
    "vit": vit,
    "deit": lambda tmp: vit(tmp, "deit"),
    "dinov2": lambda tmp: vit(tmp, "dinov2"),
    "swin": lambda tmp: vit(tmp, "swin"),
    "llava": llava,
    "llava_onevision": llava_onevision,
    "qwen2_vl": qwen2_vl,
}
