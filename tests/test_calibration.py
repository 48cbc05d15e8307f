"""One-shot multi-bit calibration (issue 4) on tiny random models: accuracy against round-to-nearest, MB-ToMe,
resume, determinism, from_pretrained, the NaN error, data inputs, architectures and the ablation switches."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import QuEPTConfig, get_bits, set_bits
from quept_hf.calibration import calibrate, engine, merge_tokens
from quept_hf.calibration.checkpoint import BlockCheckpoints
from quept_hf.calibration.data import text_windows
from quept_hf.mbclora import MBCLoRALayer

try:
    from tests.conftest import make_tiny_tokenizer
except ModuleNotFoundError:  # `tests/` itself on sys.path
    from conftest import make_tiny_tokenizer  # type: ignore[no-redef]

ALL_BITS = [2, 3, 4, 5, 6, 7, 8]
# Few steps on tiny data: 2 batches per block and epoch.
SMALL = dict(num_samples=8, seq_len=16, batch_size=4, epochs=1)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Elastic precision lets one model run at many bit-widths.",
    "Calibration reconstructs every block at once for all bits.",
    "Low-rank adapters share their components in cascade.",
    "Token merging mixes the outputs of the bit groups.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- helpers


def calibration_ids(rows: int = 32, length: int = 64, seed: int = 1) -> torch.Tensor:
    """Pre-tokenised calibration data for the tiny models (vocabulary 128)."""
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def load(folder: str, **config) -> torch.nn.Module:
    """A QuEPT model of ``folder``, weight-only, rank 4 per group, small groups, tiny calibration settings.

    AWQ-style smoothing (on by default in weight_only mode) is off unless asked for: it triples the cost of these
    tiny calibrations, and only the accuracy, resume/determinism and from_pretrained tests need the full pipeline.
    """
    config = {"ranks": [4] * 4, "group_size": 16, "smoothing": False, **SMALL, **config}
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=QuEPTConfig(**config)).eval()


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every MB-CLoRA slice and clipping logit (what calibration trains)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "mbclora_" in n or ".clip_" in n}


@torch.no_grad()
def logits_at(model: torch.nn.Module, ids: torch.Tensor, bits: list[int]) -> dict[int, torch.Tensor]:
    out = {}
    for b in bits:
        set_bits(model, b)
        out[b] = model(input_ids=ids).logits
    return out


def assert_same_calibration(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (state_a, logits_a), (state_b, logits_b) = a, b
    assert sorted(state_a) == sorted(state_b)
    different = [n for n in state_a if not torch.equal(state_a[n], state_b[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    for bits in logits_a:
        assert torch.equal(logits_a[bits], logits_b[bits]), f"logits differ at {bits} bits"


@torch.no_grad()
def block_io(model, ids: torch.Tensor, bits: int, inputs: list[torch.Tensor] | None = None) -> tuple[list, list]:
    """(input, output) of every Transformer block in one forward at ``bits``.

    With ``inputs``, block k is fed ``inputs[k]`` instead of what block k-1 produced (per-block measurement)."""
    blocks = quept_hf.models.architecture_for(model).blocks(model)
    seen_in, seen_out = [None] * len(blocks), [None] * len(blocks)

    def pre(index):
        def hook(module, args, kwargs):
            if inputs is not None:
                if args:
                    args = (inputs[index], *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": inputs[index]}
            seen_in[index] = args[0] if args else kwargs["hidden_states"]
            return args, kwargs

        return hook

    def post(index):
        def hook(module, args, output):
            seen_out[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    set_bits(model, bits)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen_in, seen_out


def block_error(out: torch.Tensor, target: torch.Tensor) -> float:
    """The calibration loss: L1 summed over the hidden dimension, averaged over tokens."""
    return (out.float() - target.float()).abs().sum(-1).mean().item()


@dataclass
class Trained:
    """What the engine trained one block on, and the block's trainable tensors just before training."""

    index: int
    x_q: torch.Tensor  # the input every group shares (MB-ToMe); `streams` holds one per group
    target: torch.Tensor
    streams: list[torch.Tensor]
    initial: dict[str, torch.Tensor]
    params: dict[str, torch.nn.Parameter]


def record_training(monkeypatch) -> list[Trained]:
    """Spy on the engine: every block it trains, with its calibration inputs X_q and float targets F(X_fp)."""
    seen = []
    original = engine._train_block

    def spy(block, x_q, y_fp, *args, **kwargs):
        params = block.state()
        initial = {n: p.detach().clone() for n, p in params.items()}
        streams = [x.clone() for x in x_q]
        seen.append(Trained(block.index, streams[-1], y_fp.clone(), streams, initial, params))
        return original(block, x_q, y_fp, *args, **kwargs)

    monkeypatch.setattr(engine, "_train_block", spy)
    return seen


# ------------------------------------------------------------------- 1. better than round-to-nearest

ACCURACY = dict(num_samples=16, seq_len=32, batch_size=4, epochs=4)
# The spec's learning rates. With lr_scaling="step" (default) lr_lora is the 2-bit rate and each group's slice
# learns at lr * step(b) / step(2), so 7e-4 suits every width (with ONE lr, 7e-4 overshot the small 5..8-bit
# errors of this hidden=64 model: blocks ended 2-56% above round-to-nearest). Clipping logits: one lr_clip.
ACCURACY_LR = dict(lr_lora=7e-4, lr_clip=2e-2)


def test_calibration_beats_round_to_nearest_at_every_bit_width(tiny_llama_dir, monkeypatch):
    """Every block, at every bit-width, on its calibration inputs: output error below round-to-nearest.

    Both models get the very same block inputs: the X_q the engine built for each block (block 0: the embeddings;
    later blocks: MB-ToMe of the calibrated previous block), against the float targets F(X_fp). End to end (each
    model feeding itself) the tiny model is NOT robustly better at 5/6 bits in block 1 (seed-dependent, 0.96 to
    1.05 x RTN): MB-ToMe trains the next block on inputs mixed with low-bit outputs (see the issue's report).
    """
    data = calibration_ids()
    windows = text_windows(data, None, ACCURACY["num_samples"], ACCURACY["seq_len"], seed=0)
    seen = record_training(monkeypatch)
    calibrated = load(tiny_llama_dir, **ACCURACY, **ACCURACY_LR, smoothing=None)
    calibrate(calibrated, data)
    group_of = {b: g for g, group in enumerate(calibrated.config.quantization_config.bit_groups) for b in group}
    x_q = {b: [t.streams[group_of[b]] for t in seen] for b in ALL_BITS}  # the inputs each bit-width trained on
    targets = [t.target for t in seen]

    _, float_out = block_io(calibrated, windows, 16)  # the engine's targets are the model's float block outputs
    for index, (expected, got) in enumerate(zip(float_out, targets, strict=True)):
        torch.testing.assert_close(got, expected, msg=f"float targets of block {index}")

    ours = {bits: block_io(calibrated, windows, bits, x_q[bits])[1] for bits in ALL_BITS}
    # Round-to-nearest = epochs=0: the same model with every block's trainable tensors put back as the engine had
    # them just before training (after smoothing: adapters at delta = 0, clipping logits at their initial value).
    with torch.no_grad():
        for block in seen:
            for name, param in block.params.items():
                param.copy_(block.initial[name])
    assert all(p.abs().sum() == 0 for n, p in adapter_state(calibrated).items() if "mbclora_B" in n)
    rtn = {bits: block_io(calibrated, windows, bits, x_q[bits])[1] for bits in ALL_BITS}

    failures, table = [], []
    for bits in ALL_BITS:
        for index, target in enumerate(targets):
            errors = block_error(ours[bits][index], target), block_error(rtn[bits][index], target)
            table.append(f"w{bits} block {index}: calibrated {errors[0]:.4f}, round-to-nearest {errors[1]:.4f}")
            if errors[0] >= errors[1]:
                failures.append(table[-1])
    assert not failures, "calibration is not better than round-to-nearest:\n" + "\n".join(table)


# --------------------------------------------------------------------------------------------- 2. MB-ToMe


def reference_merge(outputs, top_p, weights, mode):
    """MB-ToMe written out with loops over sequences and tokens (spec section 4)."""
    low, high = outputs[0], outputs[-1]
    batch, tokens, _ = high.shape
    merged = torch.empty_like(high)
    total = sum(weights)
    for s in range(batch):
        similarity = [F.cosine_similarity(low[s, t], high[s, t], dim=0).item() for t in range(tokens)]
        ranked = sorted(range(tokens), key=lambda t: -similarity[t])
        keep = set(ranked[: int(top_p * tokens)]) if mode == "mbtome" else set()
        for t in range(tokens):
            if mode == "none" or t in keep:
                merged[s, t] = high[s, t]
            else:
                merged[s, t] = sum(w / total * out[s, t] for w, out in zip(weights, outputs, strict=True))
    return merged


@pytest.mark.parametrize("mode", ["mbtome", "uniform", "none"])
@pytest.mark.parametrize(("groups", "top_p"), [(4, 0.5), (3, 0.3), (3, 0.0), (4, 1.0)])
def test_mbtome_matches_a_loop_reference(mode, groups, top_p):
    gen = torch.Generator().manual_seed(groups)
    base = torch.randn(3, 10, 8, generator=gen)
    # Outputs that agree more at higher bits, like a real block's.
    outputs = [base + torch.randn(base.shape, generator=gen) * 0.5 / (g + 1) for g in range(groups)]
    outputs[0][1, 4] = outputs[-1][1, 4] * 2  # cosine similarity 1: always among the top tokens when any are kept
    weights = [0.4, 0.3, 0.3] if groups == 3 else [0.25] * 4
    got = merge_tokens(outputs, top_p, weights, mode)
    torch.testing.assert_close(got, reference_merge(outputs, top_p, weights, mode), rtol=1e-6, atol=1e-6)
    if mode == "mbtome":
        takes_high = (got == outputs[-1]).all(-1)
        assert takes_high.sum(-1).tolist() == [int(top_p * 10)] * 3  # per sequence, not over the batch
        if top_p > 0:
            assert takes_high[1, 4]


def test_mbtome_weights_are_normalised_and_unknown_mode_is_refused():
    outputs = [torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 3.0)]
    torch.testing.assert_close(merge_tokens(outputs, 0.0, [2.0, 2.0], "uniform"), torch.full((1, 2, 4), 2.0))
    with pytest.raises(ValueError, match="token_merge='average' is unknown"):
        merge_tokens(outputs, 0.5, [1.0, 1.0], "average")


def test_engine_merges_with_the_configured_settings(tiny_llama_dir, monkeypatch):
    calls = []
    original = engine.merge_tokens

    def spy(outputs, top_p, weights, mode):
        calls.append((len(outputs), top_p, weights, mode))
        return original(outputs, top_p, weights, mode)

    monkeypatch.setattr(engine, "merge_tokens", spy)
    model = load(tiny_llama_dir, token_merge="mbtome", top_p=0.25, merge_weights=[0.1, 0.2, 0.3, 0.4])
    calibrate(model, calibration_ids(), epochs=0)
    assert calls == [(4, 0.25, [0.1, 0.2, 0.3, 0.4], "mbtome")] * 2  # once per block, one output per group


def test_separate_streams_are_the_inputs_each_bit_width_meets_at_inference(tiny_llama_dir, monkeypatch):
    """token_merge="separate": group g trains every block on exactly what the calibrated model at g's bits feeds it."""
    groups = [[2], [4], [8]]
    windows = text_windows(calibration_ids(), None, SMALL["num_samples"], SMALL["seq_len"], seed=0)
    seen = record_training(monkeypatch)
    model = load(tiny_llama_dir, bit_groups=groups, ranks=[4] * 3, merge_weights=[1, 1, 1], token_merge="separate")
    calibrate(model, calibration_ids())
    assert len(seen) == 2
    for g, (bits,) in enumerate(groups):
        inputs, _ = block_io(model, windows, bits)
        for trained in seen:
            torch.testing.assert_close(trained.streams[g], inputs[trained.index], msg=f"w{bits} block {trained.index}")
    assert not torch.equal(seen[1].streams[0], seen[1].streams[-1])  # 2-bit and 8-bit inputs differ after block 0


def test_step_scaled_learning_rates(tiny_llama_dir, monkeypatch):
    """lr_scaling="step": each group's slices learn at lr * step(b_min) / step(2); clipping logits at lr_clip."""
    seen = []
    adamw = torch.optim.AdamW

    def spy(groups, **kwargs):
        seen.append([(len(g["params"]), g["lr"]) for g in groups])
        return adamw(groups, **kwargs)

    monkeypatch.setattr(engine.torch.optim, "AdamW", spy)
    model = load(tiny_llama_dir, lr_scaling="step", lr_lora=1e-3, lr_clip=1e-2)
    calibrate(model, calibration_ids())
    per_layer = 7  # q, k, v, o, gate, up, down
    groups = [[2], [3, 4], [5, 6], [7, 8]]
    slices = [(2 * per_layer, 1e-3 * 3 / (2 ** min(g) - 1)) for g in groups]  # one (A, B) pair per layer and group
    clips = [(2 * per_layer * len(ALL_BITS), 1e-2)]  # upper + lower logits per layer and bit-width
    expected = slices + clips
    assert len(seen) == 2
    for got in seen:
        assert [n for n, _ in got] == [n for n, _ in expected]
        assert [lr for _, lr in got] == pytest.approx([lr for _, lr in expected])


# ---------------------------------------------------------------------------- 3./4. resume, determinism


def run(folder: str, seed: int = 0, **overrides) -> tuple[dict, dict]:
    """Load a fresh model, calibrate it, return (trained tensors, logits at a few bit-widths)."""
    model = load(folder, seed=seed, smoothing=None)  # the full pipeline: smoothing rewrites weights in place
    calibrate(model, calibration_ids(), **overrides)
    return adapter_state(model), logits_at(model, calibration_ids(2, 16, seed=9), [2, 3, 5, 8])


@pytest.fixture(scope="module")
def reference_run(tiny_llama_dir):
    """An uninterrupted calibration with seed 0 and no checkpoints."""
    return run(tiny_llama_dir)


def test_same_seed_gives_identical_results(tiny_llama_dir, reference_run):
    assert_same_calibration(run(tiny_llama_dir), reference_run)


def test_other_seed_gives_other_results(tiny_llama_dir, reference_run):
    state, logits = run(tiny_llama_dir, seed=1)
    ref_state, ref_logits = reference_run
    assert any(not torch.equal(state[n], ref_state[n]) for n in state if "mbclora_B" in n)
    assert not torch.equal(logits[2], ref_logits[2])


def test_resume_after_interrupt_equals_uninterrupted(tiny_llama_dir, reference_run, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    original_save = BlockCheckpoints.save

    def save_then_die(self, index, state):
        original_save(self, index, state)
        raise KeyboardInterrupt("killed after block 0")

    monkeypatch.setattr(BlockCheckpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama_dir, checkpoint_dir=str(folder))
    monkeypatch.undo()
    assert json.loads((folder / "progress.json").read_text())["completed_blocks"] == 1

    trained = record_training(monkeypatch)
    resumed = run(tiny_llama_dir, checkpoint_dir=str(folder))  # a fresh model, loaded the same way
    assert [t.index for t in trained] == [1]  # block 0 came from its checkpoint
    assert_same_calibration(resumed, reference_run)
    assert json.loads((folder / "progress.json").read_text())["completed_blocks"] == 2


def test_checkpoint_dir_of_other_settings_is_refused(tiny_llama_dir, tmp_path):
    folder = str(tmp_path / "ckpt")
    model = load(tiny_llama_dir)
    calibrate(model, calibration_ids(), epochs=0, checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"holds a calibration with other settings \(differs in \['epochs'\]\)"):
        calibrate(load(tiny_llama_dir), calibration_ids(), epochs=1, checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"other settings \(differs in \['data_sha256'\]\)"):
        calibrate(load(tiny_llama_dir), calibration_ids(seed=2), epochs=0, checkpoint_dir=folder)


# ------------------------------------------------------------------------------------ 5. from_pretrained


def test_from_pretrained_with_a_dataset_calibrates(tiny_llama_dir, tmp_path):
    tokenizer = make_tiny_tokenizer()
    config = QuEPTConfig(ranks=[4] * 4, group_size=16, smoothing=False, dataset=TEXTS, tokenizer=tokenizer, **SMALL)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config).eval()
    quant = model.config.quantization_config
    assert quant.calibrated and quant.dataset_description == "5 items of str"
    assert get_bits(model) == 8
    state = adapter_state(model)
    assert any(p.abs().sum() > 0 for n, p in state.items() if "mbclora_B" in n)  # trained: B starts at 0
    ids = calibration_ids(2, 16, seed=9)
    outputs = {}
    for bits in ALL_BITS:
        model.set_adapter(f"w{bits}")
        assert get_bits(model) == bits
        with torch.no_grad():
            outputs[bits] = model(input_ids=ids).logits
        assert torch.isfinite(outputs[bits]).all()
    assert not torch.equal(outputs[2], outputs[8])

    model.save_pretrained(tmp_path)
    raw = (tmp_path / "config.json").read_text()
    saved = json.loads(raw)["quantization_config"]
    assert saved["calibrated"] is True and saved["quant_method"] == "quept"
    assert not {"dataset", "tokenizer"} & set(saved)
    assert "quick brown fox" not in raw and "Tokenizer" not in raw


# ----------------------------------------------------------------------------------------- 6. NaN error


def test_non_finite_loss_names_block_bits_and_step(tiny_llama_dir):
    model = load(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite loss in block 1 at 2 bits, step 0"):
        calibrate(model, calibration_ids())


def test_non_finite_loss_later_in_training(tiny_llama_dir, monkeypatch):
    active = []
    set_bits_original, loss_original = engine._Block.set_bits, engine._loss

    def recording_set_bits(self, bits):
        active.append(bits)
        set_bits_original(self, bits)

    calls = []

    def poisoned_loss(out, target, kind):
        calls.append(active[-1])
        loss = loss_original(out, target, kind)
        return loss * float("nan") if len(calls) == 7 else loss  # step 1, third group ({5, 6})

    monkeypatch.setattr(engine._Block, "set_bits", recording_set_bits)
    monkeypatch.setattr(engine, "_loss", poisoned_loss)
    with pytest.raises(FloatingPointError, match="step 1") as error:
        calibrate(load(tiny_llama_dir), calibration_ids())
    assert calls[-1] in (5, 6)
    assert f"non-finite loss in block 0 at {calls[-1]} bits, step 1" in str(error.value)


# ------------------------------------------------------------------------------------------ 7. data inputs


def stream(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"])


def assert_windows_of(windows: torch.Tensor, ids: torch.Tensor, shape: tuple[int, int]) -> None:
    """Every window is a contiguous slice of the token stream ``ids``."""
    assert tuple(windows.shape) == shape and windows.dtype == torch.long
    for row in windows:
        starts = [s for s in range(len(ids) - shape[1] + 1) if torch.equal(ids[s : s + shape[1]], row)]
        assert starts, f"window {row.tolist()} is not a slice of the token stream"


def test_text_inputs_give_the_same_windows(tmp_path):
    from datasets import Dataset

    tokenizer = make_tiny_tokenizer()
    from_list = text_windows(TEXTS, tokenizer, num_samples=6, seq_len=20, seed=3)
    assert_windows_of(from_list, stream(tokenizer), (6, 20))
    path = tmp_path / "calibration.txt"
    path.write_text("\n\n".join(TEXTS), encoding="utf-8")
    dataset = Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    for data in (dataset, str(path), path):
        assert torch.equal(text_windows(data, tokenizer, num_samples=6, seq_len=20, seed=3), from_list)
    assert not torch.equal(text_windows(TEXTS, tokenizer, num_samples=6, seq_len=20, seed=4), from_list)
    # A tokenizer given by name or folder is loaded with AutoTokenizer.
    tokenizer.save_pretrained(tmp_path / "tok")
    assert torch.equal(text_windows(TEXTS, str(tmp_path / "tok"), num_samples=6, seq_len=20, seed=3), from_list)


def test_pretokenised_inputs():
    rows = calibration_ids(5, 40)
    windows = text_windows(rows, None, num_samples=7, seq_len=16, seed=0)
    assert windows.shape == (7, 16)
    assert all(any(torch.equal(w, r[:16]) for r in rows) for w in windows)  # row prefixes
    flat = rows.flatten()
    assert_windows_of(text_windows(flat, None, num_samples=4, seq_len=50, seed=0), flat, (4, 50))
    lists = [r.tolist() for r in rows]
    assert torch.equal(text_windows(lists, None, 4, 50, seed=0), text_windows(flat, None, 4, 50, seed=0))


def test_data_errors(tiny_llama_dir):
    from datasets import Dataset

    tokenizer = make_tiny_tokenizer()
    with pytest.raises(ValueError, match=r"needs a 'text' column; it has \['content'\]"):
        text_windows(Dataset.from_dict({"content": TEXTS}), tokenizer, 4, 16)
    with pytest.raises(ValueError, match="has 12 tokens, fewer than seq_len=16"):
        text_windows(["short text.."], tokenizer, 4, 16)
    with pytest.raises(ValueError, match="has 30 tokens, fewer than seq_len=64"):
        text_windows(calibration_ids(1, 30), None, 4, 64)
    with pytest.raises(ValueError, match="must hold integer ids"):
        text_windows(torch.rand(4, 32), None, 4, 16)
    with pytest.raises(ValueError, match="is not a file"):
        text_windows("no/such/file.txt", tokenizer, 4, 16)
    with pytest.raises(ValueError, match="unsupported calibration dataset of type dict"):
        text_windows({"text": TEXTS}, tokenizer, 4, 16)
    model = load(tiny_llama_dir)
    with pytest.raises(ValueError, match="calibration on text needs a tokenizer"):
        calibrate(model, TEXTS)
    with pytest.raises(ValueError, match="calibrate\\(\\) needs data"):
        calibrate(model)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['lr'\]"):
        calibrate(model, TEXTS, tokenizer=tokenizer, lr=1e-3)


# ------------------------------------------------------------------------------------- 8. architectures

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


def tiny_model(kind: str):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**TINY, sliding_window=8))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**TINY))
    layer_types = ["sliding_attention", "full_attention"]
    return Gemma3ForCausalLM(Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8, layer_types=layer_types))


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma3"])
def test_architectures_calibrate_and_switch(kind, tmp_path, monkeypatch):
    tiny_model(kind).save_pretrained(tmp_path)
    seen = record_training(monkeypatch)
    model = load(str(tmp_path))
    calibrate(model, calibration_ids())
    assert model.config.quantization_config.calibrated
    # The engine's float targets are the model's own block outputs: per-block kwargs (sliding-window masks,
    # Gemma 3's local/global rotary tables) were captured and replayed correctly. seq_len 16 > window 8.
    windows = text_windows(calibration_ids(), None, SMALL["num_samples"], SMALL["seq_len"], seed=0)
    _, float_out = block_io(model, windows, 16)
    assert [t.index for t in seen] == [0, 1]
    for trained, expected in zip(seen, float_out, strict=True):
        torch.testing.assert_close(trained.target, expected, msg=f"{kind} block {trained.index}")
    logits = logits_at(model, calibration_ids(2, 16, seed=9), [2, 5, 8, 16])
    assert all(torch.isfinite(v).all() for v in logits.values())
    assert not torch.equal(logits[2], logits[8]) and not torch.equal(logits[8], logits[16])


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    quant = QuEPTConfig(dataset=calibration_ids(), **SMALL)
    with pytest.raises(ValueError, match=r"does not support model_type='gpt2'.*supported: \[.*'llama'.*'qwen2'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant)


# ---------------------------------------------------------------------------------------- 9. ablations


@pytest.mark.parametrize(
    "setting",
    [
        {"bits": [3], "ranks": [4]},
        {"cascade": False},
        {"token_merge": "uniform", "loss": "mse"},
        {"token_merge": "none"},
        {"token_merge": "separate"},
        {"lr_scaling": "none"},
    ],
    ids=["single-bit", "independent", "uniform-merge-mse", "no-merge", "separate-streams", "one-lr"],
)
def test_ablation_switches_run(tiny_llama_dir, setting, monkeypatch):
    modes, losses = [], set()
    merge, loss = engine.merge_tokens, engine._loss
    monkeypatch.setattr(engine, "merge_tokens", lambda o, p, w, mode: modes.append(mode) or merge(o, p, w, mode))
    monkeypatch.setattr(engine, "_loss", lambda out, target, kind: losses.add(kind) or loss(out, target, kind))
    model = load(tiny_llama_dir, **setting)
    before = adapter_state(model)
    calibrate(model, calibration_ids())
    quant = model.config.quantization_config
    assert quant.calibrated
    assert all(getattr(quant, name) == value for name, value in setting.items())
    assert modes == ([] if quant.token_merge == "separate" else [quant.token_merge] * 2) and losses == {quant.loss}
    bits = quant.bits
    state = adapter_state(model)
    assert all(p.abs().sum() > 0 for n, p in state.items() if "mbclora_B" in n)  # every slice trained
    assert not any("mbclora_" in n for n in before)  # adapters are attached by calibrate (seeded)
    layer = next(m for m in model.modules() if isinstance(m, MBCLoRALayer))
    groups_high_first = quant.bit_groups[::-1]
    for b in bits:
        position = next(k for k, group in enumerate(groups_high_first) if b in group)
        assert len(layer.cascade_slices(b)[0]) == (position + 1 if quant.cascade else 1)
    logits = logits_at(model, calibration_ids(2, 16, seed=9), bits)
    assert all(torch.isfinite(v).all() for v in logits.values())


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bars_follow_transformers_logging(tiny_llama_dir, enabled, capsys, monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    model = load(tiny_llama_dir, bits=[4, 8], bit_groups=[[4], [8]], ranks=[2, 2], num_samples=4, epochs=1)
    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        calibrate(model, calibration_ids(rows=4))
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
    assert ("QuEPT calibration" in capsys.readouterr().err) == enabled
