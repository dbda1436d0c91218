"""Resume state beyond what DeepSpeed saves: data position and every RNG, per rank."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Position:
    step: int  # optimizer steps completed
    epoch: int
    step_in_epoch: int


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_rank_state(directory: str | Path, rank: int, position: Position) -> None:
    torch.save({"position": asdict(position), "rng": rng_state()}, Path(directory) / f"rank{rank}_state.pt")


def load_rank_state(directory: str | Path, rank: int) -> Position:
    state = torch.load(Path(directory) / f"rank{rank}_state.pt", weights_only=False)
    set_rng_state(state["rng"])
    return Position(**state["position"])
