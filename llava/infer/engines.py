"""The serving engines, registered in one table: adding an engine touches this module and its tests.

Each entry says which models the engine can serve and how to build it from the serving options.
`make_engine` takes the named engine, or with "auto" the first entry (in table order) that can
serve the model, so the fast engine goes first and the general one last. Options an engine does
not use are ignored by its builder (the sequential engine has no batch to size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llava.infer.engine import ContinuousEngine, SequentialEngine, full_attention
from llava.infer.generate import plain_greedy_ok

log = logging.getLogger("llava.infer")


@dataclass(frozen=True)
class EngineOptions:
    max_rows: int = 32
    admit_wait_s: float = 0.0
    compile_decode: bool = False
    prefill_tokens: int = 16384
    prefill_images: int = 64
    image_mode: str = "pad"


@dataclass(frozen=True)
class EngineSpec:
    description: str
    serves: Callable[[Any], bool]  # model -> whether this engine decodes it exactly
    build: Callable[[Any, Any, EngineOptions], Any]  # (model, processor, options) -> engine


def _continuous(model: Any, processor: Any, opts: EngineOptions) -> ContinuousEngine:
    return ContinuousEngine(model, processor, max_rows=opts.max_rows, admit_wait_s=opts.admit_wait_s,
                            compile_decode=opts.compile_decode, prefill_tokens=opts.prefill_tokens,
                            prefill_images=opts.prefill_images)


def _sequential(model: Any, processor: Any, opts: EngineOptions) -> SequentialEngine:
    return SequentialEngine(model, processor, image_mode=opts.image_mode)


ENGINES: dict[str, EngineSpec] = {
    "continuous": EngineSpec(
        "continuous batching over a shared KV cache; plain argmax/sampling and full attention only",
        lambda model: plain_greedy_ok(model) and full_attention(model),
        _continuous,
    ),
    "sequential": EngineSpec(
        "one request at a time through model.generate (logit rules, sliding-window caches)",
        lambda model: True,
        _sequential,
    ),
}


def make_engine(model: Any, processor: Any, *, engine: str = "auto", **options: Any) -> Any:
    """The engine named `engine` (it must serve the model), or with "auto" the first that does."""
    opts = EngineOptions(**options)
    if engine == "auto":
        name = next(name for name, spec in ENGINES.items() if spec.serves(model))
    elif engine not in ENGINES:
        raise ValueError(f"unknown serving engine {engine!r}; choose auto or one of {', '.join(ENGINES)}")
    elif not ENGINES[engine].serves(model):
        raise ValueError(f"engine {engine!r} cannot serve this model exactly ({ENGINES[engine].description})")
    else:
        name = engine
    log.info("serving with the %s engine", name)
    return ENGINES[name].build(model, processor, opts)
