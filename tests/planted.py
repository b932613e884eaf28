"""What an attacker would place in a checkpoint: a pickle that runs a command when loaded without a safe
unpickler (it creates a marker file), and the manifest resealed so that sizes and SHA-256 match again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gpt.checkpoint import MANIFEST, sha256_file


class Planted:
    """Pickles to a call of os.system creating `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def reseal(checkpoint: Path) -> None:
    """Recompute every manifest entry, as someone replacing a file would."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        entry.update(bytes=(checkpoint / name).stat().st_size, sha256=sha256_file(checkpoint / name))
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def plant_state_file(checkpoint: Path, marker: Path) -> None:
    """Replace a single-file checkpoint's state.pt by a training state holding `Planted`, resealed."""
    torch.save({"model": {"x": Planted(marker)}, "optimizer": {}}, checkpoint / "state.pt")
    reseal(checkpoint)
