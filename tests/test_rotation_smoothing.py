"""Rotation (QuaRot), smoothing (AWQ) and KV-cache quantization on tiny random decoders.

Hidden 48 = 12 * 4 and intermediate 96 = 12 * 8 exercise non-power-of-two Hadamard orders (Paley base 12),
head_dim 12 too; grouped-query attention (4 heads, 2 KV heads) exercises the shared value scales.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import quept_hf
from quept_hf import QuEPTConfig, quantize_model, set_bits
from quept_hf.calibration import smoothing
from quept_hf.calibration.rotation import ONLINE_HADAMARD, OnlineHadamard
from quept_hf.models import architecture_for
from quept_hf.nn.hadamard import hadamard_transform, random_hadamard_matrix
from quept_hf.nn.kv_cache import KV_ATTRIBUTE, KVQuantization, fake_quantize_kv

TINY = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ATOL = 2e-5  # float32 rounding on logits of magnitude ~1


def tiny_llama(tied: bool = True, hidden: int = 48, seed: int = 0) -> LlamaForCausalLM:
    """A random LLaMA with non-trivial norm scales and an outlier channel (what rotation/smoothing target)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "hidden_size": hidden, "intermediate_size": 2 * hidden}, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
        model.model.embed_tokens.weight[:, 3] *= 25.0  # a massive residual-stream channel
    return model


def ids(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, tokens=None) -> torch.Tensor:
    return model(input_ids=ids() if tokens is None else tokens).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def quantized(model, **config):
    return quantize_model(model, QuEPTConfig(group_size=-1, **config)).eval()


# ------------------------------------------------------------------------------------------------- config
def test_config_defaults_per_mode():
    assert QuEPTConfig().rotation is None and QuEPTConfig().smoothing is None  # None: the mode's default
    with pytest.raises(ValueError, match="rotation='yes'"):
        QuEPTConfig(rotation="yes")
    with pytest.raises(ValueError, match="smoothing=1"):
        QuEPTConfig(smoothing=1)
    wa = quantized(tiny_llama(), mode="weight_activation").config.quantization_config
    assert (wa.rotation, wa.smoothing) == (True, False)
    wo = quantized(tiny_llama()).config.quantization_config
    assert (wo.rotation, wo.smoothing) == (False, True)
    explicit = quantized(tiny_llama(), mode="weight_activation", rotation=False, smoothing=True)
    chosen = explicit.config.quantization_config
    assert (chosen.rotation, chosen.smoothing) == (False, True)
    assert QuEPTConfig.from_dict(wa.to_dict()).rotation is True


# ----------------------------------------------------------------------------------------------- rotation
@pytest.mark.parametrize(
    ("tied", "hidden", "mode", "kv_bits"),
    [(True, 48, "weight_activation", None), (False, 96, "weight_activation", 4), (True, 48, "weight_only", "follow")],
    ids=["tied-48", "untied-96-kv4", "weight-only-tied-kv-follow"],
)
def test_rotation_keeps_the_float_model(tied, hidden, mode, kv_bits):
    model = tiny_llama(tied, hidden)
    reference = logits(model)
    rotated = quantized(model, mode=mode, rotation=True, kv_bits=kv_bits)
    set_bits(rotated, 16)  # float weights; the Q/K Hadamard of the KV path still runs
    assert max_diff(logits(rotated), reference) <= ATOL * reference.abs().max().item()
    base = rotated.model
    for layer in base.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones(hidden))
        assert layer.mlp.down_proj.input_transform is ONLINE_HADAMARD
        assert (getattr(layer.self_attn, KV_ATTRIBUTE, None) is not None) == (kv_bits is not None)
    assert torch.equal(base.norm.weight, torch.ones(hidden))
    assert rotated.lm_head.weight.data_ptr() != base.embed_tokens.weight.data_ptr()
    assert rotated.config.tie_word_embeddings is False and "lm_head.weight" not in rotated.all_tied_weights_keys


def test_rotation_rotates_the_residual_stream_orthogonally():
    model = tiny_llama()
    with torch.no_grad():
        before = model(input_ids=ids(), output_hidden_states=True).hidden_states
    rotated = quantized(model, mode="weight_activation", seed=7)
    set_bits(rotated, 16)
    q = random_hadamard_matrix(48, seed=7, dtype=torch.float64)
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    with torch.no_grad():
        after = rotated(input_ids=ids(), output_hidden_states=True).hidden_states
    for h, h_rot in zip(before[:-1], after[:-1], strict=True):  # the last one is after the final norm
        assert torch.allclose((h.double() @ q).float(), h_rot, atol=1e-4 * h.abs().max().item())
    # The point of it: the massive channel is spread out, so per-token absmax falls towards the RMS.
    peak = lambda h: (h.abs().amax(-1) / h.pow(2).mean(-1).sqrt()).mean().item()  # noqa: E731
    assert peak(after[1]) < 0.5 * peak(before[1])


def test_rotation_cuts_w4a4_error():
    """Round-to-nearest W4A4 (no calibration) with outlier channels at the norm outputs (massive activations,
    as in real LLMs): rotation spreads them, so the per-token 4-bit grid keeps the other channels."""

    def spiky() -> LlamaForCausalLM:
        model = tiny_llama()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[3] = layer.post_attention_layernorm.weight[7] = 20.0
        return model

    def relative_error(model) -> float:  # last hidden state at W4A4 vs float, in the model's own basis
        with torch.no_grad():
            states = {}
            for bits in (16, 4):
                set_bits(model, bits)
                states[bits] = model(input_ids=ids(), output_hidden_states=True).hidden_states[-2]
        return ((states[4] - states[16]).norm() / states[16].norm()).item()

    plain = relative_error(quantized(spiky(), mode="weight_activation", rotation=False))
    rotated = relative_error(quantized(spiky(), mode="weight_activation", rotation=True))
    assert rotated < 0.7 * plain, (plain, rotated)


def test_rotation_refused_with_a_reason():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**{**TINY, "head_dim": 12, "sliding_window": 16})
    gemma = Gemma3ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="Gemma 3 normalises each sub-layer's output"):
        quantize_model(gemma, QuEPTConfig(mode="weight_activation", rotation=True))
    default = quantize_model(gemma, QuEPTConfig(mode="weight_activation"))  # default: skipped, not an error
    assert default.config.quantization_config.rotation is False


def test_rotated_model_saves_and_reloads(tmp_path):
    """Rotated, KV-quantized and calibrated (adapters attached): the folder reloads to the very same model."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "float")
    config = QuEPTConfig(mode="weight_activation", bits=[4, 8], ranks=[2, 2], group_size=-1, kv_bits=4)
    rotated = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config).eval()
    quept_hf.calibrate(rotated, torch.randint(0, 128, (2, 16)), num_samples=2, seq_len=16, epochs=1)
    set_bits(rotated, 4)
    expected = logits(rotated)
    rotated.save_pretrained(tmp_path / "rotated")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rotated").eval()
    saved = loaded.config.quantization_config
    assert saved.rotation is True and saved.kv_bits == 4 and loaded.config.tie_word_embeddings is False
    downs = [layer.mlp.down_proj.base_layer for layer in loaded.model.layers]  # under the MB-CLoRA adapter
    assert all(isinstance(down.input_transform, OnlineHadamard) for down in downs)
    assert loaded.config._attn_implementation.startswith("quept_kv_")
    set_bits(loaded, 4)
    assert torch.equal(logits(loaded), expected)  # bit for bit: same weights, same online transforms
    set_bits(loaded, 16)
    assert max_diff(logits(loaded), logits(model)) <= ATOL * logits(model).abs().max().item()


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("fast_hadamard_transform") is None,
    reason="needs CUDA and the fast_hadamard_transform package",
)
def test_online_hadamard_cuda_kernel_matches_cpu():
    """The rotated down_proj's online transform on CUDA (kernel) equals the pure-PyTorch CPU path."""
    torch.manual_seed(0)
    for n in (64, 576, 1536, 11008):
        x = torch.randn(3, 5, n)
        assert torch.allclose(ONLINE_HADAMARD(x.cuda()).cpu(), hadamard_transform(x), atol=1e-4)
    rotated = quantized(tiny_llama(hidden=96), mode="weight_activation", kv_bits=4)  # Q/K Hadamard too
    cpu = {}
    for bits in (16, 4):
        set_bits(rotated, bits)
        cpu[bits] = logits(rotated)
    rotated.cuda()
    for bits, tolerance in ((16, 1e-4), (4, 5e-2)):  # W4A4: a rare rounding flip moves a logit a little
        set_bits(rotated, bits)
        gpu = logits(rotated, ids().cuda()).cpu()
        assert max_diff(gpu, cpu[bits]) <= tolerance * cpu[bits].abs().max().item()


# ---------------------------------------------------------------------------------------------- smoothing
def _block_run(block, model):
    """The first block as the engine runs it: captured rotary tables and mask, float weights."""
    from quept_hf.calibration.capture import capture_block_kwargs, capture_first_block_inputs

    blocks = architecture_for(model).blocks(model)
    kwargs = capture_block_kwargs(model, blocks, {"input_ids": ids()}, {"use_cache": False})[0]
    x = capture_first_block_inputs(model, blocks, [{"input_ids": ids()}], {"use_cache": False})

    def run(hidden):
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run, x


def _block_output(model) -> torch.Tensor:
    block = architecture_for(model).blocks(model)[0]
    run, x = _block_run(block, model)
    with torch.no_grad():
        return run(x)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_smoothing_fold_keeps_the_float_model(family):
    """Random scales folded at all four sites (norm -> qkv, v -> o under GQA, norm -> gate/up, up -> down)."""
    if family == "llama":
        model = quantized(tiny_llama(), smoothing=False)
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        gemma = Gemma3ForCausalLM(Gemma3TextConfig(**{**TINY, "head_dim": 12, "sliding_window": 16})).eval()
        with torch.no_grad():
            for name, param in gemma.named_parameters():
                if "norm" in name:
                    param.normal_(0, 0.3)  # Gemma scales by (1 + weight)
        model = quantized(gemma, smoothing=False)
    set_bits(model, 16)
    reference, block_reference = logits(model), _block_output(model)
    layout = architecture_for(model).layout
    generator = torch.Generator().manual_seed(1)
    for block in architecture_for(model).blocks(model):
        pairs = smoothing._pairs(block, layout)
        assert [p.name for p in pairs] == ["attention input", "value -> output", "MLP input", "up -> down"]
        for pair in pairs:
            width = pair.norm.weight.numel() if pair.norm is not None else smoothing._base(pair.writer).out_features
            smoothing._apply(pair, 0.5 + 2 * torch.rand(width, generator=generator), layout.norm_offset)
    assert max_diff(_block_output(model), block_reference) <= ATOL * block_reference.abs().max().item()
    assert max_diff(logits(model), reference) <= ATOL * reference.abs().max().item()


@pytest.mark.parametrize("scored", [[2], [2, 4]])
def test_smoothing_search_lowers_the_error_of_every_scored_bit_width(scored):
    model = quantized(tiny_llama(), smoothing=False)
    block = architecture_for(model).blocks(model)[0]
    run, x = _block_run(block, model)
    set_bits(model, 16)
    with torch.no_grad():
        target = run(x)

    def error(bits: int) -> float:
        with torch.no_grad():
            set_bits(model, bits)
            value = (run(x) - target).pow(2).mean().item()
            set_bits(model, 16)
            return value

    before = {b: error(b) for b in scored}
    layout = architecture_for(model).layout
    alphas = smoothing.smooth_block(block, run, x, layout, scored, 2, torch.device("cpu"), grid=5)
    assert set(alphas) == {"attention input", "value -> output", "MLP input", "up -> down"}
    assert any(a > 0 for a in alphas.values())
    with torch.no_grad():
        assert max_diff(run(x), target) <= ATOL * target.abs().max().item()  # float unchanged
    assert all(error(b) < before[b] for b in scored), {b: (before[b], error(b)) for b in scored}


def test_search_bits_are_the_lowest_of_each_granularity_and_the_highest():
    sizes = {2: 128, 3: 128, **dict.fromkeys(range(4, 9), -1)}
    assert smoothing.search_bits([2, 3, 4, 5, 6, 7, 8], sizes) == [2, 4, 8]
    assert smoothing.search_bits([4, 8], {4: 32, 8: 32}) == [4, 8]
    assert smoothing.search_bits([3], {3: 128}) == [3]


@pytest.mark.parametrize("optimum", [0, 7, 8, 19])
def test_coarse_to_fine_finds_the_exhaustive_optimum_of_a_unimodal_score_with_half_the_evaluations(optimum):
    evaluated = set()

    def score(index: int) -> float:
        evaluated.add(index)
        return (index - optimum) ** 2

    assert smoothing.coarse_to_fine(score, 20) == optimum
    assert len(evaluated) <= 12


def test_smoothing_skips_the_rotated_down_proj():
    model = quantized(tiny_llama(), rotation=True, smoothing=True)
    names = [p.name for p in smoothing._pairs(model.model.layers[0], architecture_for(model).layout)]
    assert names == ["attention input", "value -> output", "MLP input"]


def test_calibration_with_smoothing_keeps_the_float_model(monkeypatch):
    model = tiny_llama()
    reference = logits(model)
    elastic = quantized(model, bits=[2, 8], ranks=[2, 2], num_samples=4, seq_len=16, epochs=0)
    monkeypatch.setattr(smoothing, "GRID", 4)
    before = {n: p.clone() for n, p in elastic.named_parameters() if "norm" in n}
    quept_hf.calibrate(elastic, torch.randint(0, 128, (4, 16)))
    assert any(not torch.equal(p, before[n]) for n, p in elastic.named_parameters() if "norm" in n)  # smoothed
    set_bits(elastic, 16)
    assert max_diff(logits(elastic), reference) <= ATOL * reference.abs().max().item()


# ---------------------------------------------------------------------------------------------- KV cache
def reference_kv_quantize(x: torch.Tensor, bits: int, group: int, clip: float = 0.95) -> torch.Tensor:
    """Plain loop: every `group` consecutive values of the last axis share an asymmetric (scale, zero)."""
    out = torch.empty_like(x)
    flat, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for row in range(flat.shape[0]):
        for start in range(0, x.shape[-1], group):
            values = flat[row, start : start + group]
            hi, lo = clip * max(values.max().item(), 0.0), clip * min(values.min().item(), 0.0)
            scale = max((hi - lo) / (2**bits - 1), 1e-8)
            zero = round(-lo / scale)
            codes = torch.clamp(torch.round(values / scale) + zero, 0, 2**bits - 1)
            flat_out[row, start : start + group] = (codes - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 4])
def test_kv_quantizer_matches_reference(bits, group):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 5, 12) * torch.linspace(0.1, 4, 12)
    x[0, 0, 0] = x[0, 0, 0].abs()  # an all-positive group: the range must still contain 0
    expected = reference_kv_quantize(x, bits, group or 12)
    assert torch.allclose(fake_quantize_kv(x, bits, group_size=group), expected, atol=1e-6)
    x.requires_grad_(True)
    fake_quantize_kv(x, bits).sum().backward()
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0} and x.grad.mean() > 0.8  # straight-through, 0 where clipped


@pytest.mark.parametrize("probs", [False, True], ids=["sdpa", "quept_eager"])
def test_kv_attention_keeps_the_causal_mask(probs):
    """The wrapped attention gets the mask format of the implementation it wraps (sdpa, or eager-style)."""
    model = quantized(tiny_llama(), mode="weight_activation", kv_bits=4, quantize_attention_probs=probs)
    set_bits(model, 16)
    reference = logits(tiny_llama())
    assert max_diff(logits(model), reference) <= ATOL * reference.abs().max().item()
    set_bits(model, 4)
    tokens = ids()
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % TINY["vocab_size"]
    assert torch.equal(logits(model, tokens)[:, :-1], logits(model, changed)[:, :-1])  # no peeking ahead


def test_kv_bits_fixed_follow_and_float():
    model = quantized(tiny_llama(), mode="weight_activation", kv_bits="follow")
    attention = model.model.layers[0].self_attn
    set_bits(model, 6)
    assert getattr(attention, KV_ATTRIBUTE).kv_bits(attention) == 6
    assert KVQuantization(4).kv_bits(attention) == 4
    set_bits(model, 16)
    assert KVQuantization(4).kv_bits(attention) is None  # the float reference stays float


@pytest.mark.parametrize("rotation", [False, True])
def test_generate_with_a_4bit_kv_cache(rotation):
    """generate() runs, and every step's logits equal a cache-free forward of the same tokens: quantizing
    per (token, head) on read equals quantizing once on write."""
    model = quantized(tiny_llama(), mode="weight_activation", kv_bits=4, rotation=rotation)
    set_bits(model, 8)
    prompt = ids(length=6)[:1]
    out = model.generate(
        prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    assert out.sequences.shape == (1, 12)
    full = logits(model, out.sequences[:, :-1])[0, 5:]
    stepped = torch.cat(out.logits)
    assert max_diff(stepped, full) <= 1e-4 * full.abs().max().item()
    without_kv = quantized(tiny_llama(), mode="weight_activation", rotation=rotation)
    set_bits(without_kv, 8)
    assert max_diff(logits(without_kv, out.sequences), logits(model, out.sequences)) > 0  # the KV quantizer acts
