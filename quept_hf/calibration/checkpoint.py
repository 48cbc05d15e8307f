"""Per-block calibration checkpoints: a killed run restarts at the next block with the same result.

A checkpoint folder is resumed only by the run that made it: the fingerprint (`BlockCheckpoints.fingerprint`)
covers the settings, the calibration data AND the model (its architecture and a digest of each block's float
weights), so another model with the same settings is refused instead of silently taking its calibrated blocks.
Each block file's sha256 is kept in ``progress.json`` and checked on resume: a flipped byte or a truncated file
is refused, never loaded as a calibration.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from ..atomic import atomic_write, atomic_write_text, file_sha256

# Fingerprint keys that describe the model rather than the settings (`quept_hf.calibration.engine._fingerprint`).
MODEL_KEYS = ("architecture", "block_weights_sha256", "other_weights_sha256")


class BlockCheckpoints:
    """``progress.json`` (fingerprint, finished blocks, their files' sha256) + one safetensors file per block."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.progress_path = self.directory / "progress.json"
        self._digests: dict[str, str] = {}

    def completed(self) -> int:
        """Number of finished blocks (0 for a new run); refuses a folder made for another model or settings."""
        if not self.progress_path.exists():
            return 0
        progress = json.loads(self.progress_path.read_text())
        stored = progress.get("fingerprint") or {}
        if stored != self.fingerprint:
            raise ValueError(self._mismatch(stored))
        self._digests = dict(progress.get("block_sha256") or {})
        return int(progress["completed_blocks"])

    def _mismatch(self, stored: dict) -> str:
        """The refusal: which checkpoint_dir, and what differs (settings by name, blocks by index)."""
        changed = sorted(k for k in {*self.fingerprint, *stored} if stored.get(k) != self.fingerprint.get(k))
        model = [_describe(k, stored.get(k), self.fingerprint.get(k)) for k in changed if k in MODEL_KEYS]
        where = f"checkpoint_dir {str(self.directory)!r}"
        if model:
            return (
                f"{where} holds the calibration of another model (differs in {model}); use a new checkpoint_dir "
                "for this model"
            )
        return (
            f"{where} holds a calibration with other settings (differs in {changed}); use a new checkpoint_dir or "
            "the same settings"
        )

    def save(self, index: int, state: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}

        def write(tmp: str) -> None:
            save_file(tensors, tmp)
            self._digests[self._block_path(index).name] = file_sha256(tmp)

        atomic_write(self._block_path(index), write)
        progress = {"fingerprint": self.fingerprint, "completed_blocks": index + 1, "block_sha256": self._digests}
        atomic_write_text(self.progress_path, json.dumps(progress, indent=2))

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """The block's tensors, after checking the file is byte for byte the one that was saved."""
        path = self._block_path(index)
        expected = self._digests.get(path.name)
        data = path.read_bytes() if path.is_file() else None
        if data is None or expected is None or hashlib.sha256(data).hexdigest() != expected:
            state = "is missing" if data is None else "has no recorded sha256" if expected is None else "is corrupted"
            raise ValueError(
                f"checkpoint_dir {str(self.directory)!r}: block file {path.name} {state} (its sha256 does not match "
                "progress.json); delete the folder (or use a new checkpoint_dir) to calibrate from scratch"
            )
        return load_bytes(data)

    def _block_path(self, index: int) -> Path:
        return self.directory / f"block_{index:04d}.safetensors"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors (names, dtypes, shapes and bytes, in name order): cheap next to calibrating."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.device.type != "meta":
            digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _describe(key: str, stored: Any, current: Any) -> str:
    """``"float weights of blocks [0, 1]"`` for per-block digests, ``"architecture: 'A' (checkpoint) vs 'B'"``..."""
    if key == "block_weights_sha256" and isinstance(stored, list) and isinstance(current, list):
        if len(stored) != len(current):
            return f"number of blocks: {len(stored)} (checkpoint) vs {len(current)}"
        differing = [i for i, (a, b) in enumerate(zip(stored, current, strict=True)) if a != b]
        return f"float weights of blocks {differing}"
    if stored is None:
        return f"{key}: not recorded (the folder was written by an older quept_hf)"
    if key == "other_weights_sha256":
        return "float weights outside the blocks (embeddings, head, norms)"
    return f"{key}: {stored!r} (checkpoint) vs {current!r}"
