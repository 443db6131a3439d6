"""Device selection: `auto` means CUDA when present, else CPU; the same code path on both."""
from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA device is visible; "
                           "use device: auto or device: cpu")
    return torch.device(name)


def set_deterministic(device: torch.device) -> None:
    """On CPU the same seed must give the same selection bit for bit."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
