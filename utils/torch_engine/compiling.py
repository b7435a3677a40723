"""torch.compile for the training model: each transformer layer (regional) or the whole model.

Regional compilation compiles one ``GPTNeoXLayer`` with ``fullgraph=True`` and reuses that
code for every other layer (torch inlines the modules' parameters as graph inputs), so the
1.2B model compiles once, not 24 times, and a graph break is an error instead of a silent
slowdown. The embeddings, final norm and the chunked loss stay eager: they are a few large
matmuls that gain nothing from fusion. ``--compile-scope model`` compiles the whole model as
one graph instead (the benchmark measures both). Always after ``accelerator.prepare()``.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel


def repeated_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer layers: the classes transformers names in ``_no_split_modules``
    (the units FSDP wraps too), found through DDP/FSDP/peft wrappers."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    names: set[str] = set()
    for module in inner.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in inner.modules() if type(m).__name__ in names]


def compile_model(model: torch.nn.Module, scope: str,
                  backend: str | Any = "inductor") -> tuple[torch.nn.Module, str]:
    """(the model to train, what was compiled); regional compilation changes it in place."""
    if scope == "model":
        return torch.compile(model, backend=backend), "the whole model"
    layers = repeated_layers(model)
    if not layers:  # not a transformers model with layers: fall back to the whole
        return torch.compile(model, backend=backend), "the whole model"
    for layer in layers:
        layer.compile(fullgraph=True, backend=backend)
    return model, f"{len(layers)} x {type(layers[0]).__name__} (regional, fullgraph)"
