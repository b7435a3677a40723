"""torch.compile for the training model: each transformer layer (regional) or the whole model.

Regional compilation compiles one ``GPTNeoXLayer`` with ``fullgraph=True`` and reuses that
code for every other layer (torch inlines the modules' parameters as graph inputs), so the
1.2B model compiles once, not 24 times, and a graph break is an error instead of a silent
slowdown. The embeddings, final norm and the chunked loss stay eager: they are a few large
matmuls that gain nothing from fusion. ``--compile-scope model`` compiles the whole model as
one graph instead (the benchmark measures both). Always after ``accelerator.prepare()``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)


def repeated_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer layers: the classes transformers names in ``_no_split_modules``
    (the units FSDP wraps too), found through DDP/FSDP/peft wrappers."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    names: set[str] = set()
    for module in inner.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in inner.modules() if type(m).__name__ in names]


def _weight_cast_policy(_ctx: object, func: object, *args: Any,
                        **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing's choice per op: autocast's casts of weights and biases (a
    float tensor of at most 2 dimensions cast to a narrower float) are recomputed in
    backward; everything else is left to the partitioner's own min-cut, as without it."""
    if func is torch.ops.aten._to_copy.default and args and isinstance(args[0], torch.Tensor):
        source, target = args[0], kwargs.get("dtype")
        if (source.dim() <= 2 and source.is_floating_point() and target is not None
                and torch.finfo(target).bits < torch.finfo(source.dtype).bits):
            return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_SAVE


def recompute_weight_casts(layer: torch.nn.Module) -> None:
    """Under autocast the compiled layer would save each weight's bf16 cast for backward
    (the partitioner's min-cut prefers 2 saved bytes per weight to recomputing them from the
    4-byte fp32 weight, not knowing the fp32 weight stays alive anyway): 96 MiB per
    neox-1.2b layer, 2.25 GiB per micro-batch in flight. Checkpointing the layer with a
    policy that marks those casts for recomputation saves the fp32 weight (already resident)
    instead; backward re-reads it. A trade, so not the default: bench/sim_gpu.py measured
    2.3 GiB less at +2.2 ms of H100 bound per micro-batch (neox-1.2b, seq 2048), worth it
    only where those GiB let a larger micro-batch fit. ``forward`` is wrapped in place, so
    parameter names do not change."""
    forward = layer.forward
    contexts = partial(create_selective_checkpoint_contexts, _weight_cast_policy)

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    layer.forward = checkpointed


def compile_model(model: torch.nn.Module, scope: str, backend: str | Any = "inductor",
                  recompute_casts: bool = False) -> tuple[torch.nn.Module, str]:
    """(the model to train, what was compiled); regional compilation changes it in place.
    ``recompute_casts`` (mixed precision): each layer recomputes its weights' casts in
    backward instead of saving them (``recompute_weight_casts``)."""
    if scope == "model":
        return torch.compile(model, backend=backend), "the whole model"
    layers = repeated_layers(model)
    if not layers:  # not a transformers model with layers: fall back to the whole
        return torch.compile(model, backend=backend), "the whole model"
    for layer in layers:
        if recompute_casts:
            recompute_weight_casts(layer)
        layer.compile(fullgraph=True, backend=backend)
    return model, f"{len(layers)} x {type(layers[0]).__name__} (regional, fullgraph)"
