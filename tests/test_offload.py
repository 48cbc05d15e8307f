"""Models larger than memory (issue 20): calibration and freeze of a model dispatched by accelerate with part of its
weights on disk give bit for bit the in-memory results; activations on disk; the peak-memory plan."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import quept_hf
from quept_hf import QuEPTConfig
from quept_hf.calibration import memory, plan
from quept_hf.calibration.offload import offloaded_units, onloaded
from quept_hf.packing.stream import INDEX_NAME, save_frozen

try:
    from tests.conftest import TINY_LLAMA
except ModuleNotFoundError:  # `tests/` itself on sys.path
    from conftest import TINY_LLAMA  # type: ignore[no-redef]

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = 3
# Blocks 1 and 2 on disk; smoothing on, so calibration rewrites float weights of the offloaded blocks too.
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
    "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
}  # fmt: skip
SETTINGS = dict(ranks=[4] * 4, group_size=16, num_samples=8, seq_len=16, batch_size=4, epochs=1, smoothing=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": BLOCKS})).eval()
    path = tmp_path_factory.mktemp("tiny_llama_3")
    model.save_pretrained(path)
    return str(path)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


def _load(folder: str, offload_dir=None, **settings) -> torch.nn.Module:
    config = QuEPTConfig(**{**SETTINGS, **settings}, dataset=_ids())
    if offload_dir is None:
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config).eval()
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map=DEVICE_MAP, offload_folder=str(offload_dir)
    ).eval()


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor, offloaded ones read back from where accelerate keeps them."""
    state = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    for name, unit in offloaded_units(model).items():
        with onloaded(unit, "cpu"):
            state.update({f"{name}.{k}": v.clone() for k, v in unit.state_dict().items()})
    return state


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module, bits=(2, 3, 4, 5, 6, 7, 8, 16)) -> None:
    x, y = _full_state(a), _full_state(b)
    assert sorted(x) == sorted(y)
    assert [k for k in x if not torch.equal(x[k], y[k])] == []
    inputs = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    for b_ in bits:
        quept_hf.set_bits(a, b_)
        quept_hf.set_bits(b, b_)
        with torch.no_grad():
            assert torch.equal(a(inputs).logits, b(inputs).logits), f"logits differ at {b_} bits"


@pytest.fixture(scope="module")
def in_memory(folder) -> torch.nn.Module:
    return _load(folder)


@pytest.fixture(scope="module")
def offloaded(folder, tmp_path_factory) -> torch.nn.Module:
    return _load(folder, tmp_path_factory.mktemp("offload"))


def test_offloaded_model_keeps_blocks_on_meta(offloaded):
    assert sorted(offloaded_units(offloaded)) == ["model.layers.1", "model.layers.2"]
    block = offloaded.model.layers[1]
    assert {p.device.type for p in block.parameters()} == {"meta"}  # calibrated and written back, not resident
    assert {p.device.type for p in offloaded.model.layers[0].parameters()} == {"cpu"}


def test_calibration_with_disk_offload_is_bit_identical(in_memory, offloaded):
    _assert_same_model(in_memory, offloaded)


def test_streamed_freeze_is_bit_identical(in_memory, offloaded, tmp_path):
    reference = quept_hf.freeze(in_memory, bits=[2, 4, 8])
    frozen = AutoModelForCausalLM.from_pretrained(save_frozen(offloaded, tmp_path / "frozen", bits=[2, 4, 8]))
    _assert_same_model(reference, frozen, bits=(2, 4, 8))


def test_streamed_freeze_head_bits(in_memory, tmp_path):
    reference = quept_hf.freeze(in_memory, bits=[3], head_bits=8)
    frozen = AutoModelForCausalLM.from_pretrained(save_frozen(in_memory, tmp_path / "f", bits=[3], head_bits=8))
    _assert_same_model(reference, frozen, bits=(3,))


def test_activations_on_disk_are_logged_and_identical(folder, in_memory, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="quept_hf.calibration.engine"):
        model = _load(folder, tmp_path / "offload", activations_dir=str(tmp_path / "acts"))
    assert f"memory-mapped in {tmp_path / 'acts'}" in caplog.text
    _assert_same_model(in_memory, model, bits=(2, 8))


def test_plan_says_what_is_where(offloaded):
    result = plan(offloaded, offloaded.config.quantization_config)
    text = str(result)
    assert "on disk" in text and "one block at a time on cpu" in text and "activations" in text
    assert result.offloaded_weights["disk"] > 0 and result.block_weights > 0


def test_plan_refuses_when_one_block_does_not_fit(offloaded, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    config = offloaded.config.quantization_config
    with pytest.raises(MemoryError, match="for ONE block"):
        plan(offloaded, config, check=True)
    with pytest.raises(MemoryError, match="for ONE block"):
        quept_hf.calibrate(offloaded, _ids())


def test_device_map_unit_spanning_blocks_is_refused(folder, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers": "disk"}  # fmt: skip
    config = QuEPTConfig(**SETTINGS)
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map=device_map, offload_folder=str(tmp_path)
    )
    with pytest.raises(ValueError, match="holds several calibration blocks"):
        quept_hf.calibrate(model, _ids())


def test_freeze_of_an_offloaded_model_points_to_save_frozen(offloaded):
    with pytest.raises(ValueError, match="save_frozen"):
        quept_hf.freeze(offloaded)


class _Delta:
    """A trainable low-rank `WeightDelta`, as MB-CLoRA hands one to its base layer."""

    requires_grad = True

    def __init__(self, rows: int, cols: int):
        generator = torch.Generator().manual_seed(3)
        self.b = torch.randn(rows, 2, generator=generator).mul(0.01).requires_grad_()
        self.a = torch.randn(2, cols, generator=generator).requires_grad_()

    def __call__(self) -> torch.Tensor:
        return self.b @ self.a

    def cache_key(self) -> tuple:
        return (self.a._version, self.b._version)


def _saved_bytes_and_grads(checkpointing: bool, quantize_activations: bool):
    """Bytes the autograd graph keeps after one forward, and the gradients of the input, delta and clipping."""
    from quept_hf.nn import QuEPTLinear

    torch.manual_seed(0)
    layer = QuEPTLinear.from_linear(
        torch.nn.Linear(64, 96), bits=[3, 4], group_size={3: 16, 4: -1}, quantize_activations=quantize_activations
    )
    layer.set_bits(3)
    layer.gradient_checkpointing = checkpointing
    for p in layer.clip_upper.values():
        p.requires_grad_(True)
    delta = _Delta(96, 64)
    x = torch.randn(5, 64, requires_grad=True)
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, delta)
    kept = sum(saved)
    layer.set_bits(4)  # a switch before backward must not change what is recomputed
    out.square().sum().backward()
    return kept, [t.grad for t in (x, delta.a, delta.b, layer.clip_upper["3"])]


@pytest.mark.parametrize("quantize_activations", [False, True])
def test_gradient_checkpointing_recomputes_the_weight_copies(quantize_activations):
    kept, grads = _saved_bytes_and_grads(False, quantize_activations)
    kept_ckpt, grads_ckpt = _saved_bytes_and_grads(True, quantize_activations)
    weight_bytes = 64 * 96 * 4
    assert kept >= 3 * weight_bytes  # W + delta, its rounded / clipped copies, the quantized weight
    assert kept_ckpt < weight_bytes  # only the (small) input and parameters
    for got, want in zip(grads_ckpt, grads, strict=True):
        assert got is not None and torch.equal(got, want)


def test_calibration_with_gradient_checkpointing_is_bit_identical(folder, in_memory, tmp_path):
    model = _load(folder, tmp_path / "offload", gradient_checkpointing=True)
    _assert_same_model(in_memory, model, bits=(2, 3, 8))


def test_plan_counts_one_layer_with_gradient_checkpointing(offloaded):
    config = offloaded.config.quantization_config
    full = plan(offloaded, config)
    one_layer = plan(offloaded, QuEPTConfig.from_dict({**config.to_dict(), "gradient_checkpointing": True}))
    assert one_layer.block_graph < full.block_graph and one_layer.block_weights == full.block_weights


def test_gradient_checkpointing_must_be_a_bool():
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        QuEPTConfig(gradient_checkpointing="yes")


def test_save_frozen_replaces_the_folder_wholly_or_not_at_all(in_memory, tmp_path, monkeypatch):
    from quept_hf.packing import stream

    folder = tmp_path / "frozen"
    save_frozen(in_memory, folder, bits=[4])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_shard, written = stream._write_shard, []

    def fails_on_the_second_shard(target, name, state, metadata):
        if written:
            raise OSError("No space left on device")
        written.append(name)
        write_shard(target, name, state, metadata)

    monkeypatch.setattr(stream, "_write_shard", fails_on_the_second_shard)
    with pytest.raises(OSError, match="No space left"):
        save_frozen(in_memory, folder, bits=[2, 8])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frozen"]  # no staging folder left behind
    monkeypatch.setattr(stream, "_write_shard", write_shard)
    save_frozen(in_memory, folder, bits=[2, 8])
    kept = AutoModelForCausalLM.from_pretrained(folder).config.quantization_config.frozen["bits"]
    assert {tuple(widths) for widths in kept.values()} == {(2, 8)}  # the new checkpoint, whole


@pytest.mark.parametrize("bits_or_plan", [4, {"model.layers.1": 8, "model.layers.2": 3}])
def test_gguf_export_of_an_offloaded_model_is_byte_identical(in_memory, offloaded, bits_or_plan, tmp_path):
    reference = quept_hf.export(in_memory, bits_or_plan, tmp_path / "memory.gguf", format="gguf")
    streamed = quept_hf.export(offloaded, bits_or_plan, tmp_path / "offloaded.gguf", format="gguf")
    assert Path(streamed).read_bytes() == Path(reference).read_bytes()
    assert {p.device.type for p in offloaded.model.layers[1].parameters()} == {"meta"}  # let go after writing


def test_save_pretrained_of_an_offloaded_model_reloads_bit_identical(in_memory, offloaded, tmp_path):
    offloaded.save_pretrained(tmp_path / "offloaded")
    in_memory.save_pretrained(tmp_path / "memory")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded")
    _assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "memory"), reloaded, bits=(2, 4, 8, 16))
    assert {p.device.type for p in offloaded.model.layers[1].parameters()} == {"meta"}  # still offloaded


def test_save_pretrained_of_an_offloaded_model_refuses_when_ram_is_short(offloaded, tmp_path, monkeypatch):
    from quept_hf import saving

    monkeypatch.setattr(saving, "available_memory", lambda device: 1000)
    with pytest.raises(MemoryError, match="save_frozen"):
        offloaded.save_pretrained(tmp_path / "elastic")
    assert not (tmp_path / "elastic").exists()


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def _config_without_dtype(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


@pytest.mark.parametrize("bits_or_plan", [4, {"model.layers.1": 8, "model.layers.2": 3}])
def test_packed_export_of_an_offloaded_model_is_the_in_memory_one(in_memory, offloaded, bits_or_plan, tmp_path):
    reference = Path(quept_hf.export(in_memory, bits_or_plan, tmp_path / "memory"))
    streamed = Path(quept_hf.export(offloaded, bits_or_plan, tmp_path / "offloaded"))
    assert len(list(streamed.glob("model-*.safetensors"))) == BLOCKS + 1  # one shard per block, then the rest
    x, y = _folder_tensors(reference), _folder_tensors(streamed)
    assert sorted(x) == sorted(y) and [k for k in x if not torch.equal(x[k], y[k])] == []
    assert _config_without_dtype(streamed) == _config_without_dtype(reference)
    inputs = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(reference)(inputs).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(streamed)(inputs).logits, expected)
    assert {p.device.type for p in offloaded.model.layers[1].parameters()} == {"meta"}  # let go after writing


@pytest.mark.parametrize(("bits", "target"), [(4, None), (3, None), (8, "vllm")])
def test_compressed_tensors_export_of_an_offloaded_model_is_the_in_memory_one(
    in_memory, offloaded, bits, target, tmp_path
):
    from quept_hf.packing.interop import compressed_tensors_available, export_compressed_tensors

    if not compressed_tensors_available():
        pytest.skip("compressed-tensors is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the W8A8 re-grid warning: its report is compared below
        reference = Path(export_compressed_tensors(in_memory, bits, tmp_path / "memory", target=target))
        streamed = Path(export_compressed_tensors(offloaded, bits, tmp_path / "offloaded", target=target))
    assert len(list(streamed.glob("model-*.safetensors"))) == BLOCKS + 1 and (streamed / INDEX_NAME).is_file()
    x, y = _folder_tensors(reference), _folder_tensors(streamed)
    assert sorted(x) == sorted(y) and [k for k in x if not torch.equal(x[k], y[k])] == []
    assert _config_without_dtype(streamed) == _config_without_dtype(reference)
    if target is not None:  # the conversion error, added up block by block, is the whole model's
        report = json.loads((streamed / "quept_export.json").read_text())
        assert report == json.loads((reference / "quept_export.json").read_text()) and report["rows"] > 0


def test_in_memory_builds_of_an_offloaded_model_point_to_the_streamed_writers(offloaded, tmp_path):
    with pytest.raises(ValueError, match=r"pack_model: the model's weights are offloaded.*save_frozen.*export\("):
        quept_hf.pack_model(offloaded, 4)
    with pytest.raises(ValueError, match=r"\['max_shard_size'\] apply to save_pretrained.*one safetensors shard"):
        quept_hf.export(offloaded, 4, tmp_path / "packed", max_shard_size="1MB")
    assert not (tmp_path / "packed").exists()


def _load_offloaded(folder: Path, tmp_path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "off"))


def test_saved_elastic_checkpoint_loads_offloaded_bit_identical(in_memory, tmp_path):
    in_memory.save_pretrained(tmp_path / "elastic")
    reloaded = _load_offloaded(tmp_path / "elastic", tmp_path)
    assert sorted(offloaded_units(reloaded)) == ["model.layers.1", "model.layers.2"]
    assert {p.device.type for p in reloaded.model.layers[2].parameters()} == {"meta"}
    _assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "elastic"), reloaded)
    # the big-model path end to end: calibrated once, saved, reloaded offloaded, exported block by block
    streamed = Path(quept_hf.export(reloaded, 3, tmp_path / "packed"))
    assert (
        _folder_tensors(streamed).keys() == _folder_tensors(Path(quept_hf.export(in_memory, 3, tmp_path / "p"))).keys()
    )


def test_offloaded_load_refuses_an_adapter_without_a_slice(in_memory, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    in_memory.save_pretrained(tmp_path / "elastic")
    adapter = tmp_path / "elastic" / "adapter_model.safetensors"
    with safe_open(adapter, framework="pt") as f:
        metadata = f.metadata()
        names = [k for k in f.keys() if k != "base_model.model.model.layers.2.mlp.up_proj.mbclora_B.1"]  # noqa: SIM118
        kept = {k: f.get_tensor(k) for k in names}
    save_file(kept, adapter, metadata=metadata)
    with pytest.raises(ValueError, match=r"lacks tensors of bit-width.*layers\.2\.mlp\.up_proj\.mbclora_B\.1"):
        _load_offloaded(tmp_path / "elastic", tmp_path)


@pytest.mark.parametrize("compensated", [None, [8]])
def test_streamed_freeze_with_error_compensation_is_bit_identical(in_memory, offloaded, compensated, tmp_path):
    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    options = {"error_compensation": data, "error_compensation_bits": compensated}
    reference = quept_hf.freeze(in_memory, bits=[2, 3, 8], **options)
    plain = quept_hf.freeze(in_memory, bits=[3])
    moved = reference.model.layers[2].mlp.down_proj.qweight["3"], plain.model.layers[2].mlp.down_proj.qweight["3"]
    assert torch.equal(*moved) == (compensated == [8])  # W3 compensated unless only W8 is asked for
    folder = save_frozen(offloaded, tmp_path / "frozen", bits=[2, 3, 8], **options)
    assert sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".")) == []  # parked codes gone
    _assert_same_model(reference, AutoModelForCausalLM.from_pretrained(folder), bits=(2, 3, 8))


def test_rotation_of_an_offloaded_model_is_bit_identical(folder, tmp_path):
    """QuaRot-style rotation (W4A4's default) rewrites every layer: an offloaded model gets it one block at a time."""
    settings = dict(mode="weight_activation", rotation=True, smoothing=False, ranks=[4] * 3)
    reference, offloaded = _load(folder, **settings), _load(folder, tmp_path / "offload", **settings)
    assert {p.device.type for p in offloaded.model.layers[2].parameters()} == {"meta"}
    assert offloaded.config.quantization_config.rotation and reference.config.quantization_config.rotation
    _assert_same_model(reference, offloaded, bits=(4, 6, 8, 16))
