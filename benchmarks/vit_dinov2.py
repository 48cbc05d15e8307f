"""DINOv2-small (real weights) at W4A4 ... W8A8: float vs round-to-nearest vs QuEPT, one calibrated model.

    python benchmarks/vit_dinov2.py            # 224 px, 1000 probe-train / 500 test images, 256 calibration images
    python benchmarks/vit_dinov2.py --quick    # 112 px, 300 / 200 images, 32 calibration images, 2 epochs

DINOv2 has no classification head, so a linear probe (multinomial logistic regression) is trained on the FLOAT
model's CLS features of Fashion-MNIST training images; every model is then scored by the probe's top-1 on
held-out Fashion-MNIST test images. Calibration uses other Fashion-MNIST training images (disjoint from the
probe's). The same model is measured twice: after ``calibrate(epochs=0)`` — round-to-nearest weights with
LayerNorm folding and MSE-initialised per-tensor activation scales, no learning ("RTN") — and after the full
QuEPT calibration ("QuEPT"). On the 20 real ImageNet photos of foolbox it reports the cosine similarity of
quantized and float CLS features and the nearest-neighbour agreement (each photo's most similar other photo,
quantized vs float features).

Prints the table and writes benchmarks/results/vit_dinov2.csv (and .png).
Weights: benchmarks/assets/dinov2_from_onnx.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import _common as common
import numpy as np
import torch
import torch.nn.functional as F
import vit_data
from PIL import Image
from transformers import Dinov2Model

import quept_hf
from quept_hf.evaluation import top1_accuracy

HERE = Path(__file__).resolve().parent
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
BITS = [4, 5, 6, 7, 8]


def parse_args() -> argparse.Namespace:
    parser = common.parser(__doc__)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--train", type=int, default=1000, help="probe training images (balanced)")
    parser.add_argument("--test", type=int, default=500, help="held-out test images (balanced)")
    parser.add_argument("--calib", type=int, default=256, help="calibration images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="rank each bit group adds (spec ViT: 16/32/48)")
    return parser.parse_args()


def dinov2_folder() -> str:
    spec = importlib.util.spec_from_file_location("dinov2_from_onnx", HERE / "assets" / "dinov2_from_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not (module.DEFAULT_OUT / "model.safetensors").is_file():
        module.convert(module.DEFAULT_OUT)
    return str(module.DEFAULT_OUT)


def fashion_pixels(images: np.ndarray, resolution: int) -> torch.Tensor:
    """Grey 28 x 28 -> RGB ``resolution`` px, ImageNet-normalised (what the DINOv2 backbone was trained on)."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


def photo_pixels(paths: list[Path], resolution: int) -> torch.Tensor:
    """Resize the shorter side to 8/7 of ``resolution``, centre-crop, normalise (DINOv2's evaluation transform)."""
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        scale = resolution * 8 / 7 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    return (torch.stack(out) - MEAN) / STD


@torch.no_grad()
def cls_features(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    steps = range(0, len(pixels), batch_size)
    chunks = [model(pixel_values=pixels[i : i + batch_size]).last_hidden_state[:, 0] for i in steps]
    return torch.cat(chunks)


class Probe:
    """Multinomial logistic regression on standardised features (L-BFGS, light L2)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3):
        self.mean, self.std = features.mean(0), features.std(0).clamp(min=1e-6)
        x = (features - self.mean) / self.std
        self.linear = torch.nn.Linear(x.shape[1], int(labels.max()) + 1)
        optimizer = torch.optim.LBFGS(self.linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(self.linear(x), labels) + l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std).argmax(-1)


def neighbours(features: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row."""
    x = F.normalize(features, dim=-1)
    similarity = x @ x.T
    similarity.fill_diagonal_(-2)
    return similarity.argmax(-1)


def evaluate(model, probe, test_x, test_y, photos, float_photo_features) -> dict[str, float]:
    photo_features = cls_features(model, photos)
    return {
        "top1": top1_accuracy(model, test_x, test_y, batch_size=50, head=probe.predict) * 100,  # probe on CLS
        "imagenet_cos": F.cosine_similarity(photo_features, float_photo_features, dim=-1).mean().item(),
        "imagenet_nn_agree": (neighbours(photo_features) == neighbours(float_photo_features)).float().mean().item()
        * 100,
    }


def main() -> None:
    quick = dict(resolution=112, train=300, test=200, calib=32, epochs=2, batch_size=8)
    args = common.setup(parse_args(), quick)
    start = time.time()
    folder = dinov2_folder()
    train_images, train_labels = vit_data.fashion_mnist("train")
    test_images, test_labels = vit_data.fashion_mnist("test")
    train_idx = vit_data.balanced_subset(train_labels, args.train // 10, seed=0)
    calib_pool = np.setdiff1d(np.arange(len(train_labels)), train_idx)
    calib_idx = np.random.default_rng(1).choice(calib_pool, args.calib, replace=False)
    test_idx = vit_data.balanced_subset(test_labels, args.test // 10, seed=2)
    train_x = fashion_pixels(train_images[train_idx], args.resolution)
    calib_x = fashion_pixels(train_images[calib_idx], args.resolution)
    test_x, test_y = fashion_pixels(test_images[test_idx], args.resolution), torch.from_numpy(test_labels[test_idx])
    photos = photo_pixels([p for p, _ in vit_data.imagenet_images()], args.resolution)

    float_model = Dinov2Model.from_pretrained(folder).eval()
    probe = Probe(cls_features(float_model, train_x), torch.from_numpy(train_labels[train_idx]).long())
    float_photos = cls_features(float_model, photos)
    rows = {"float": evaluate(float_model, probe, test_x, test_y, photos, float_photos)}
    print(f"float: {rows['float']}  ({time.time() - start:.0f}s)", flush=True)

    config = quept_hf.QuEPTConfig(
        mode="weight_activation", bits=BITS, ranks=[args.rank] * 3, dataset=calib_x, num_samples=args.calib,
        batch_size=args.batch_size, epochs=0, lr_lora=1e-3, lr_clip=1e-2,
    )  # fmt: skip
    model = Dinov2Model.from_pretrained(folder, quantization_config=config).eval()  # calibrate(epochs=0): RTN
    for b in BITS:
        quept_hf.set_bits(model, b)
        rows[f"rtn w{b}"] = evaluate(model, probe, test_x, test_y, photos, float_photos)
        print(f"RTN W{b}A{b}: {rows[f'rtn w{b}']}  ({time.time() - start:.0f}s)", flush=True)
    quept_hf.calibrate(model, calib_x, epochs=args.epochs)
    for b in BITS:
        quept_hf.set_bits(model, b)
        rows[f"quept w{b}"] = evaluate(model, probe, test_x, test_y, photos, float_photos)
        print(f"QuEPT W{b}A{b}: {rows[f'quept w{b}']}  ({time.time() - start:.0f}s)", flush=True)
    report(rows, args, time.time() - start)


def report(rows: dict[str, dict[str, float]], args: argparse.Namespace, seconds: float) -> None:
    setting = (
        f"{args.resolution}px, probe {args.train} / test {args.test} Fashion-MNIST, calib {args.calib}, "
        f"{args.epochs} epochs, rank {args.rank}/group, {seconds / 60:.1f} min"
    )
    print(f"\nDINOv2-small, Fashion-MNIST linear probe top-1 (%) and ImageNet-20 agreement ({setting})")
    header = f"{'bits':<8}{'float':>8}{'RTN':>8}{'QuEPT':>8} | {'cos RTN':>8}{'cos QuEPT':>10} | "
    print(header + f"{'NN RTN':>7}{'NN QuEPT':>9}")
    flt = rows["float"]
    lines = []
    for b in BITS:
        rtn, qe = rows[f"rtn w{b}"], rows[f"quept w{b}"]
        top1 = f"W{b}A{b:<5}{flt['top1']:>8.1f}{rtn['top1']:>8.1f}{qe['top1']:>8.1f}"
        cos = f"{rtn['imagenet_cos']:>8.4f}{qe['imagenet_cos']:>10.4f}"
        print(f"{top1} | {cos} | {rtn['imagenet_nn_agree']:>7.0f}{qe['imagenet_nn_agree']:>9.0f}")
        lines.append([f"W{b}A{b}", flt["top1"], rtn["top1"], qe["top1"], rtn["imagenet_cos"], qe["imagenet_cos"],
                      rtn["imagenet_nn_agree"], qe["imagenet_nn_agree"], setting])  # fmt: skip
    header = ["bits", "float_top1", "rtn_top1", "quept_top1", "rtn_imagenet_cos", "quept_imagenet_cos",
              "rtn_imagenet_nn_agree", "quept_imagenet_nn_agree", "setting"]  # fmt: skip
    plot = common.Plot("bits", ["rtn_top1", "quept_top1"], ylabel="linear-probe top-1 (%)", reference={"float":
                       flt["top1"]}, title="DINOv2-small, Fashion-MNIST linear probe")  # fmt: skip
    common.write_results("vit_dinov2", [dict(zip(header, line, strict=True)) for line in lines], plot)


if __name__ == "__main__":
    main()
