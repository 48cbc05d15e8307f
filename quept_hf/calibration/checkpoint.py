"""Per-block calibration checkpoints: a killed run restarts at the next block with the same result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write, atomic_write_text


class BlockCheckpoints:
    """``progress.json`` (settings fingerprint, finished blocks) + one safetensors file per finished block."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.progress_path = self.directory / "progress.json"

    def completed(self) -> int:
        """Number of finished blocks (0 for a new run); refuses a folder made with other settings."""
        if not self.progress_path.exists():
            return 0
        progress = json.loads(self.progress_path.read_text())
        if progress["fingerprint"] != self.fingerprint:
            changed = sorted(k for k in self.fingerprint if progress["fingerprint"].get(k) != self.fingerprint.get(k))
            raise ValueError(
                f"checkpoint_dir {str(self.directory)!r} holds a calibration with other settings (differs in "
                f"{changed}); use a new checkpoint_dir or the same settings"
            )
        return int(progress["completed_blocks"])

    def save(self, index: int, state: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write(self._block_path(index), lambda tmp: save_file(tensors, tmp))
        progress = {"fingerprint": self.fingerprint, "completed_blocks": index + 1}
        atomic_write_text(self.progress_path, json.dumps(progress, indent=2))

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self._block_path(index))

    def _block_path(self, index: int) -> Path:
        return self.directory / f"block_{index:04d}.safetensors"
