"""One-shot multi-bit calibration: block-wise reconstruction with three-tier bit sampling (spec sections 2-4).

Peak memory: the model's weights, plus the calibration activations — three float tensors of
``num_samples x seq_len x hidden`` (the float inputs X_fp, the quantized inputs X_q and the float targets)
and one more while MB-ToMe builds the next X_q (with ``token_merge="separate"``, one X_q per bit group) —
all on the CPU; plus ONE block (its weights, MB-CLoRA slices, clipping logits, AdamW state and the autograd
graph of ``batch_size`` samples per bit group) on the compute device (CUDA when available, else the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.utils.logging import tqdm  # honours transformers.logging.disable_progress_bar()

from ..compat import unwrap
from ..config import CALIBRATION_SETTINGS, QuEPTConfig, quept_config
from ..mbclora import MBCLoRAConfig, MBCLoRALayer, adapter_name_for_bits
from ..models import Architecture, Chain, architecture_for, fold_block_norms
from ..nn import FLOAT_BITS, QuEPTLinear, float_reference
from ..switch import set_bits
from .capture import capture_block_kwargs, capture_first_block_inputs, to_device
from .checkpoint import BlockCheckpoints, tensors_sha256
from .data import describe, text_windows
from .mbtome import merge_tokens
from .memory import plan as memory_plan
from .offload import (
    ActivationStore,
    has_offloaded,
    is_offloaded,
    onloaded,
    prepare,
    replay,
    resident_device,
    stored_tensor,
)
from .smoothing import search_bits, smooth_block

logger = logging.getLogger(__name__)

# how this run keeps its tensors (where, and whether recomputed): same result, neither fingerprinted nor recorded
RUN_SETTINGS = ("activations_dir", "gradient_checkpointing")
MIN_LR_RATIO = 0.01  # cosine schedule down to lr/100
STATS_SAMPLES = 16  # calibration samples used to measure LayerNorm ranges and initialise activation scales


@dataclasses.dataclass
class _Block:
    """One Transformer block with the handles the engine needs."""

    index: int
    module: nn.Module
    kwargs: dict
    layers: dict[str, MBCLoRALayer]
    unbatched: bool = False
    store: ActivationStore = dataclasses.field(default_factory=ActivationStore)

    def set_bits(self, bits: int) -> None:
        for layer in self.layers.values():
            if bits >= FLOAT_BITS:
                layer.base_layer.set_bits(FLOAT_BITS)
            else:
                layer.set_adapter(adapter_name_for_bits(bits))

    def trainable(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(MB-CLoRA slices, per-bit clipping logits) of the block."""
        lora = [p for n, p in self.module.named_parameters() if "mbclora_" in n]
        clips = [p for n, p in self.module.named_parameters() if ".clip_" in n]
        return lora, clips

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.module.named_parameters() if "mbclora_" in n or ".clip_" in n}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.state()
        missing = sorted(set(params) - set(state))
        if missing:
            raise ValueError(f"calibration checkpoint of block {self.index} lacks {missing[:4]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.module(hidden.squeeze(0) if self.unbatched else hidden, **self.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out.unsqueeze(0) if self.unbatched else out


def calibrate(
    model: nn.Module, dataset: Any = None, tokenizer: Any = None, processor: Any = None, **overrides: Any
) -> nn.Module:
    """Calibrate a QuEPT model once for every bit-width of its config; returns the model (changed in place).

    Args:
        model: a model loaded with ``quantization_config=QuEPTConfig(...)`` (or a ``peft.PeftModel`` of one).
        dataset: calibration data (see `quept_hf.calibration.data.text_windows` for text, `image_batches` for
            images and image-text pairs); default: the config's.
        tokenizer: tokenizer for text data; default: the config's.
        processor: image processor (ViTs) or processor (VLMs); default: the config's ``image_processor`` /
            ``processor``.
        overrides: calibration settings replacing the config's for this run (``epochs=5``, ``lr_lora=...``).

    Afterwards every bit-width adapter (``model.set_adapter("w2")`` ... ``"w8"``) is calibrated.
    """
    config = quept_config(model)
    settings = _settings(config, overrides)
    dataset = dataset if dataset is not None else config.dataset
    tokenizer = tokenizer if tokenizer is not None else config.tokenizer
    if dataset is None:
        raise ValueError("calibrate() needs data: pass dataset=... (texts, a datasets.Dataset, a file or token ids)")
    arch = architecture_for(model)
    if arch.input_kind != "text":
        tokenizer = processor or config.processor or config.image_processor or tokenizer
    base = unwrap(model)
    if is_offloaded(base):
        prepare(base)  # every tensor stored where accelerate keeps the unit, before adapters are added
    _ensure_adapters(model, config, settings.seed)
    batches = _model_batches(arch, dataset, tokenizer, settings, _vocab_size(base))
    _run(base, arch, batches, config, settings)
    config.calibrated = True
    config.dataset_description = describe(dataset)
    for name in CALIBRATION_SETTINGS:
        if name != "checkpoint_dir":
            setattr(config, name, getattr(settings, name))
    set_bits(model, config.default_bits)
    return model


def _settings(config: QuEPTConfig, overrides: dict) -> QuEPTConfig:
    allowed = [*CALIBRATION_SETTINGS, *RUN_SETTINGS]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"calibrate() got unknown setting(s) {unknown}; allowed: {allowed}")
    merged = {**config.to_dict(), **overrides}
    return QuEPTConfig.from_dict(merged)  # validates the overrides like any config


def _ensure_adapters(model: nn.Module, config: QuEPTConfig, seed: int) -> None:
    """Attach the elastic MB-CLoRA adapter when the model has none (seeded init, so runs are reproducible)."""
    if any(isinstance(m, MBCLoRALayer) for m in model.modules()):
        return
    if hasattr(model, "get_base_model"):
        raise ValueError(
            "the PeftModel carries no MB-CLoRA adapter: build it with peft.get_peft_model(m, MBCLoRAConfig())"
        )
    adapter = MBCLoRAConfig(bit_groups=config.bit_groups, ranks=config.ranks, cascade=config.cascade)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model.add_adapter(adapter)
        base = unwrap(model)
        if is_offloaded(base):  # offloaded layers got meta slices: initialise every layer again, in the same order
            torch.manual_seed(seed)
            replay(base, MBCLoRALayer, lambda layer: layer.update_layer(layer._root(), layer.elastic[layer._root()]))
            prepare(base)
    finally:
        torch.random.set_rng_state(state)


def _vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding: the token ids a model can read (None when it has no token embedding)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embedding, "num_embeddings", None)


def _model_batches(
    arch: Architecture, dataset: Any, tokenizer: Any, settings: QuEPTConfig, vocab_size: int | None = None
) -> list[dict]:
    if arch.input_kind != "text":
        from .data import image_batches

        return image_batches(dataset, tokenizer, settings, kind=arch.input_kind)
    ids = text_windows(dataset, tokenizer, settings.num_samples, settings.seq_len, settings.seed, vocab_size)
    return [{"input_ids": ids[i : i + settings.batch_size]} for i in range(0, len(ids), settings.batch_size)]


def _run(base: nn.Module, arch: Architecture, batches: list[dict], config: QuEPTConfig, settings: QuEPTConfig) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = [to_device(b, resident_device(base)) for b in batches]
    if is_offloaded(base):
        _check_units(base, prepare(base), arch, config)
    logger.info("%s", memory_plan(base, settings, device=device, check=True))
    checkpoints = None
    if settings.checkpoint_dir:
        fingerprint = {**_fingerprint(settings, batches), **_model_fingerprint(base, arch, config)}
        checkpoints = BlockCheckpoints(settings.checkpoint_dir, fingerprint)
    done = checkpoints.completed() if checkpoints else 0
    if done:
        logger.info("QuEPT calibration resumes after block %d (checkpoint_dir=%s)", done, settings.checkpoint_dir)
    offset = 0  # blocks are numbered across chains (vision tower first), for checkpoints and seeds
    for chain in arch.chains(base, config.quantize_vision_tower):
        _run_chain(base, arch, chain, batches, config, settings, checkpoints, done, offset, device)
        offset += len(chain.blocks)


def _run_chain(
    base: nn.Module,
    arch: Architecture,
    chain: Chain,
    batches: list[dict],
    config: QuEPTConfig,
    settings: QuEPTConfig,
    checkpoints: BlockCheckpoints | None,
    done: int,
    offset: int,
    device: torch.device,
) -> None:
    """Calibrate one chain of blocks: X_fp from the float model, X_q from the model as quantized so far."""
    if chain.unbatched and settings.batch_size != 1:
        raise ValueError(f"{chain.name} packs every image of a batch into one sequence: calibrate with batch_size=1")
    forward_kwargs = dict(arch.forward_kwargs)
    blocks = chain.blocks
    model_device = resident_device(base)
    store = ActivationStore(settings.activations_dir)
    all_kwargs = capture_block_kwargs(base, blocks, batches[0], forward_kwargs, arch.first_sample)
    with float_reference(base):
        x_fp = store.keep(capture_first_block_inputs(base, blocks, batches, forward_kwargs, chain.unbatched))
    # One quantized input stream per bit group; they are the same tensor unless token_merge="separate".
    x_q = store.keep(capture_first_block_inputs(base, blocks, batches, forward_kwargs, chain.unbatched))
    x_q = [x_q] * len(settings.bit_groups)
    for position in tqdm(range(len(blocks)), desc=f"QuEPT calibration ({chain.name})", unit="block"):
        index = offset + position
        kwargs = to_device(all_kwargs[position], device)
        block = _Block(index, blocks[position], kwargs, _adapter_layers(blocks[position]), chain.unbatched, store)
        try:
            with _placed(block.module, device, model_device):
                _prepare_block(block, arch, x_fp, x_q, settings, device)
                y_fp = _forward_all(block, x_fp, FLOAT_BITS, settings.batch_size, device)
                if index < done:
                    block.load_state(checkpoints.load(index))
                else:
                    _train_block(block, x_q, y_fp, settings, _generator(settings.seed, index, "train"), device)
                    if checkpoints:
                        checkpoints.save(index, block.state())
                # Its own stream: a restored block must draw the same MB-ToMe bits as a trained one.
                x_q = _next_inputs(block, x_q, settings, _generator(settings.seed, index, "merge"), device)
                x_fp = y_fp
                if position in chain.transitions:
                    x_fp, x_q = _transitions(base, chain.transitions[position], block, x_fp, x_q, settings, device)
        finally:
            block.set_bits(config.default_bits)


@contextlib.contextmanager
def _placed(module: nn.Module, device: torch.device, model_device: torch.device) -> Iterator[None]:
    """One block on the compute device while it is calibrated: an offloaded one is loaded from where accelerate
    keeps it and its results are written back there (`offload.onloaded`); a resident one is moved and back."""
    if has_offloaded(module):
        with onloaded(module, device):
            yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(model_device)


def _transitions(base, transition, block, x_fp, x_q, settings, device):
    """Run a between-blocks module (Swin's patch merging) on the float and every quantized stream."""
    model_device = resident_device(base)
    transition.to(device)
    try:
        with float_reference(base):
            x_fp = _transition(transition, block, x_fp, settings.batch_size, device)
        move = functools.partial(_transition, transition, block, batch_size=settings.batch_size, device=device)
        return x_fp, _per_stream(x_q, move)
    finally:
        transition.to(model_device)


def _check_units(base: nn.Module, units: dict[str, nn.Module], arch: Architecture, config: QuEPTConfig) -> None:
    """Calibration loads one block at a time: an offloaded device_map entry may be a block, lie inside one or
    outside every block, but not hold several blocks."""
    blocks = {id(b) for chain in arch.chains(base, config.quantize_vision_tower) for b in chain.blocks}
    for name, unit in units.items():
        if any(id(m) in blocks for m in unit.modules() if m is not unit):
            raise ValueError(
                f"device_map offloads {name!r} as one unit, which holds several calibration blocks: QuEPT loads one "
                "block at a time, so give each block its own device_map entry (device_map='auto' does)"
            )


def _prepare_block(
    block: _Block, arch: Architecture, x_fp: torch.Tensor, x_q: list[torch.Tensor], settings: QuEPTConfig, device
) -> None:
    """Data-dependent set-up before training: AWQ-style smoothing (decoder LLMs, `smoothing.smooth_block`), fold
    LayerNorm scales, then initialise per-tensor activation scales.

    Both are deterministic functions of the inputs, so a resumed run (blocks loaded from checkpoints) redoes
    them identically; the learned activation scales then come from the checkpoint.
    """
    if _smoothing_on(settings, arch):
        with torch.no_grad():
            bits = search_bits(settings.bits, settings.group_size)
            smooth_block(block.module, block, x_fp, arch.layout, bits, settings.batch_size, device)
    n = min(len(x_fp), STATS_SAMPLES)
    if arch.norm_folds:
        measure = lambda: _forward_all(block, x_fp[:n], FLOAT_BITS, settings.batch_size, device)  # noqa: E731
        fold_block_norms(block.module, arch.norm_folds, measure)
    layers = [m for m in block.module.modules() if isinstance(m, QuEPTLinear) and len(m.clip_act)]
    if not layers:
        return
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def record(i: int):
        def hook(module, args):
            x = args[0] if module.input_transform is None else module.input_transform(args[0])
            inputs[i].append(x.detach())

        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        _forward_all(block, x_q[-1][:n], FLOAT_BITS, settings.batch_size, device)
    finally:
        for handle in handles:
            handle.remove()
    for i, layer in enumerate(layers):
        layer.init_activation_scales(torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[i]]))


def _smoothing_on(settings: QuEPTConfig, arch: Architecture) -> bool:
    """``smoothing=None`` means the mode's default (weight_only) where the architecture has a decoder layout."""
    if settings.smoothing and arch.layout is None:
        raise ValueError(f"QuEPTConfig(smoothing=True): {arch.name} has no decoder layout to smooth")
    wanted = settings.smoothing if settings.smoothing is not None else settings.mode == "weight_only"
    return bool(wanted) and arch.layout is not None


@torch.no_grad()
def _transition(transition: nn.Module, block: _Block, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Run a between-blocks module (Swin's patch merging) with the block arguments it accepts."""
    accepted = inspect.signature(transition.forward).parameters
    kwargs = {k: v for k, v in block.kwargs.items() if k in accepted}
    outs = [transition(x[i : i + batch_size].to(device), **kwargs).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


def _adapter_layers(block: nn.Module) -> dict[str, MBCLoRALayer]:
    layers = {n: m for n, m in block.named_modules() if isinstance(m, MBCLoRALayer)}
    bare = [n for n, m in block.named_modules() if isinstance(m, QuEPTLinear) and not n.endswith("base_layer")]
    if bare:
        raise ValueError(f"QuEPT layers without an MB-CLoRA adapter in the block: {bare[:4]}")
    return layers


@torch.no_grad()
def _forward_all(block: _Block, x: torch.Tensor, bits: int, batch_size: int, device: torch.device) -> torch.Tensor:
    block.set_bits(bits)
    outs = (block(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size))
    return block.store.stack(outs, len(x))


def _train_block(
    block: _Block,
    x_q: list[torch.Tensor],
    y_fp: torch.Tensor,
    settings: QuEPTConfig,
    generator: torch.Generator,
    device: torch.device,
) -> None:
    """AdamW over (MB-CLoRA slices, clipping logits); each step samples one bit-width per group."""
    lora, clips = block.trainable()
    groups = _parameter_groups(block, settings)
    steps_per_epoch = math.ceil(len(y_fp) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    if total == 0:
        return
    for p in lora + clips:
        p.requires_grad_(True)
    for layer in block.layers.values():
        layer.owned_gradients = settings.cascade_training == "owned"
        layer.base_layer.gradient_checkpointing = settings.gradient_checkpointing
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: _cosine(t, total))
    progress = tqdm(total=total, desc=f"block {block.index}", leave=False, unit="step")
    step = 0
    try:
        for _ in range(settings.epochs):
            order = torch.randperm(len(y_fp), generator=generator)
            for start in range(0, len(y_fp), settings.batch_size):
                rows = order[start : start + settings.batch_size]
                inputs = [x[rows].to(device) for x in x_q] if _separate(settings) else [x_q[-1][rows].to(device)]
                losses = _step(block, inputs, y_fp[rows].to(device), settings, generator, step)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                progress.update()
                progress.set_postfix({f"w{b}": f"{v:.4f}" for b, v in losses.items()})
                step += 1
    finally:
        progress.close()
        for p in lora + clips:
            p.requires_grad_(False)
        for layer in block.layers.values():
            layer.owned_gradients = False
            layer.base_layer.gradient_checkpointing = False
    logger.debug("block %d calibrated: last losses %s", block.index, losses)


def _parameter_groups(block: _Block, settings: QuEPTConfig) -> list[dict]:
    """AdamW groups: MB-CLoRA slices at ``lr_lora``, clipping logits at ``lr_clip``; with ``lr_scaling="step"``
    one group per bit group for the slices, each lr scaled by the group's grid step.

    Clipping logits keep one lr: an Adam step moves a clip ratio by ``sigmoid'(u) * lr_clip`` (about 4e-4 of the
    range at the initial logit), a tenth of even an 8-bit grid step. Scaled, the 8-bit clipping stayed frozen
    at its initial 0.982 of the range, which alone costs the row extremes about two 8-bit steps."""
    lora, clips = block.trainable()
    if settings.lr_scaling == "none":
        return [{"params": lora, "lr": settings.lr_lora}, {"params": clips, "lr": settings.lr_clip}]
    low = min(settings.bits)
    groups = []
    for group in settings.bit_groups:
        slices = [p for layer in block.layers.values() for p in layer.group_parameters(group)]
        groups.append({"params": slices, "lr": settings.lr_lora * (2**low - 1) / (2 ** min(group) - 1)})
    assigned = {id(p) for g in groups for p in g["params"]}
    missed = [n for n, p in block.module.named_parameters() if id(p) in {id(q) for q in lora} - assigned]
    if missed:
        raise RuntimeError(f"lr_scaling='step' found adapter slices of no bit group: {missed[:4]}")
    return [g for g in groups if g["params"]] + [{"params": clips, "lr": settings.lr_clip}]


def _step(
    block: _Block,
    inputs: list[torch.Tensor],
    target: torch.Tensor,
    settings: QuEPTConfig,
    generator: torch.Generator,
    step: int,
) -> dict[int, float]:
    """One forward per bit group at a bit-width drawn uniformly from it; the summed loss is backpropagated.

    ``inputs`` holds one batch per group (``token_merge="separate"``) or one batch shared by every group.
    """
    losses = {}
    for g, group in enumerate(settings.bit_groups):
        bits = group[int(torch.randint(len(group), (1,), generator=generator))]
        block.set_bits(bits)
        loss = _loss(block(inputs[g % len(inputs)]), target, settings.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"QuEPT calibration diverged: non-finite loss in block {block.index} at {bits} bits, step {step} "
                "(try a lower lr_lora / lr_clip, or check the model's float outputs for inf/NaN)"
            )
        loss.backward()
        losses[bits] = loss.item()
    return losses


def _loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over the hidden dimension, averaged over tokens (spec section 2)."""
    diff = out.float() - target.float()
    per_token = diff.abs().sum(-1) if kind == "l1" else diff.pow(2).sum(-1)
    return per_token.mean()


def _cosine(step: int, total: int) -> float:
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


@torch.no_grad()
def _next_inputs(
    block: _Block, x_q: list[torch.Tensor], settings: QuEPTConfig, generator: torch.Generator, device: torch.device
) -> list[torch.Tensor]:
    """Run the calibrated block once per group (a random bit each); then MB-ToMe merges the outputs per token
    into the one input every group shares, or (``token_merge="separate"``) each group keeps its own output."""
    chosen = [g[int(torch.randint(len(g), (1,), generator=generator))] for g in settings.bit_groups]
    outputs = [_forward_all(block, x, bits, settings.batch_size, device) for x, bits in zip(x_q, chosen, strict=True)]
    if _separate(settings):
        return outputs
    merged = merge_tokens(outputs, settings.top_p, settings.merge_weights, settings.token_merge)
    return [block.store.keep(merged)] * len(outputs)


def _separate(settings: QuEPTConfig) -> bool:
    return settings.token_merge == "separate"


def _per_stream(x_q: list[torch.Tensor], fn) -> list[torch.Tensor]:
    """Apply ``fn`` once per distinct input stream (shared streams stay shared)."""
    done: dict[int, torch.Tensor] = {}
    for x in x_q:
        if id(x) not in done:
            done[id(x)] = fn(x)
    return [done[id(x)] for x in x_q]


def _generator(seed: int, index: int, stream: str) -> torch.Generator:
    """Seeded generator of one block: ``"train"`` (batch order, bit sampling) or ``"merge"`` (MB-ToMe bits)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 2 + (stream == "merge"))


def _fingerprint(settings: QuEPTConfig, batches: list[dict]) -> dict:
    """What a checkpoint_dir must match to be resumed: the settings and the calibration data."""
    keys = ("mode", "bits", "bit_groups", "ranks", "group_size", "zero_point", "cascade", "cascade_training")
    keys += CALIBRATION_SETTINGS
    keys += ("rotation", "smoothing", "kv_bits")  # they change the weights / the block function
    full = settings.to_dict()
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            digest.update(name.encode())
            value = batch[name]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            digest.update(value if isinstance(value, bytes) else repr(value).encode())
    fingerprint = {k: full[k] for k in keys if k != "checkpoint_dir"}
    return {**fingerprint, "data_sha256": digest.hexdigest()}


def _model_fingerprint(base: nn.Module, arch: Architecture, config: QuEPTConfig) -> dict:
    """The model a checkpoint_dir belongs to: its class, family and block count, and a digest of each block's float
    state (and of the weights outside the blocks) taken before any block is calibrated. Without it a folder filled
    by model A resumed into model B when settings and data matched. MB-CLoRA slices and clipping logits are left
    out: calibration trains them, the float weights it starts from define the model."""
    blocks = [block for chain in arch.chains(base, config.quantize_vision_tower) for block in chain.blocks]
    names = {id(module): name for name, module in base.named_modules()}
    prefixes = [names[id(block)] + "." for block in blocks]
    groups: list[dict[str, tuple]] = [{} for _ in range(len(blocks) + 1)]  # last: outside every block
    trained = (*MBCLoRALayer.adapter_layer_names, "clip_upper.", "clip_lower.", "clip_act.")
    for key, tensor in base.state_dict().items():
        if any(part in key for part in trained):
            continue
        owner = next((i for i, prefix in enumerate(prefixes) if key.startswith(prefix)), len(blocks))
        groups[owner][key.removeprefix(prefixes[owner]) if owner < len(blocks) else key] = (key, tensor)
    return {
        "architecture": f"{type(base).__name__} ({arch.name}, {len(blocks)} blocks)",
        "block_weights_sha256": [_group_sha256(base, group) for group in groups[:-1]],
        "other_weights_sha256": _group_sha256(base, groups[-1]),
    }


def _group_sha256(base: nn.Module, group: dict[str, tuple[str, torch.Tensor]]) -> str:
    """Offloaded (meta) tensors are read from where accelerate keeps them, one group (block) at a time."""
    values = {}
    for name, (key, tensor) in group.items():
        stored = stored_tensor(base, key) if tensor.device.type == "meta" else None
        values[name] = tensor if stored is None else stored
    return tensors_sha256(values)
