"""Float8 training (``--fp8``) of the transformer's linear layers with torchao.

Float8 matmuls (``torch._scaled_mm``) need CUDA tensor cores of compute capability 8.9 or
newer (Ada, Hopper, Blackwell), so ``fp8_unavailable`` says in one line why a run cannot use
them; the engine turns that into a ``ConfigError`` instead of failing deep in the first step.
``to_float8`` swaps the linear layers for torchao's ``Float8Linear`` before
``accelerator.prepare()`` and ``torch.compile`` (torchao's order: convert, then compile, which
fuses the scaling casts). Master weights, optimizer state and the autocast output stay as they
were: only the matmuls run in float8, with torchao's default dynamic tensorwise scaling.

torchao is imported only when float8 is asked for: with it installed, transformers imports it
in every process that builds a model (about 0.3 s, and on a CPU machine warnings about its
CUDA libraries), which is why the dev requirements leave it out.
"""

from __future__ import annotations

import re
from importlib import metadata

import torch
from torch import nn

MIN_CAPABILITY = (8, 9)
FP8_DIM_MULTIPLE = 16  # torch._scaled_mm wants both matmul dimensions divisible by 16
# torchao release -> the oldest torch it supports (torchao 0.18's __init__ refuses its CUDA
# extensions below torch 2.11, and its float8 ops register torch 2.11 operators). A torchao
# newer than the table inherits the last entry's minimum: a lower bound, never a false refusal.
_MIN_TORCH_FOR_TORCHAO: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = (
    ((0, 18), (2, 11)),
)
INSTALL_HINT = "pip install torchao==0.18.0 (for torch 2.11 or newer)"


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _torchao_version() -> str | None:
    """The installed torchao's version, without importing it (importing takes seconds)."""
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return None


def _min_torch(torchao_version: str) -> tuple[int, int] | None:
    mine = _major_minor(torchao_version)
    if mine is None:
        return None
    needed = None
    for release, torch_version in _MIN_TORCH_FOR_TORCHAO:
        if mine >= release:
            needed = torch_version
    return needed


def fp8_unavailable(device: torch.device) -> str | None:
    """Why float8 training cannot run on ``device`` (one line), or None when it can."""
    torchao_version = _torchao_version()
    if torchao_version is None:
        return f"float8 training needs torchao, which is not installed: {INSTALL_HINT}"
    if device.type != "cuda":
        return (f"float8 training needs a CUDA GPU of compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (sm89: Ada, Hopper, Blackwell); "
                f"this run is on {device.type}")
    if torch.version.cuda is None:
        return "float8 training through torchao needs a CUDA build of torch (this one is not)"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"float8 training needs compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (sm89: Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    needed, have = _min_torch(torchao_version), _major_minor(torch.__version__)
    if needed is not None and have is not None and have < needed:
        return (f"torchao {torchao_version} needs torch {needed[0]}.{needed[1]} or newer, "
                f"this is torch {torch.__version__}: install the torchao release that matches "
                f"this torch")
    try:
        import torchao.float8  # noqa: F401
    except Exception as exc:  # a broken or mismatched build fails in many ways
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"torchao {torchao_version} does not import with torch {torch.__version__}: {first}"
    return None


def to_float8(model: nn.Module) -> int:
    """Swap the transformer's ``nn.Linear`` layers for torchao's Float8Linear, in place.

    Left in bf16: the LM head (``model.get_output_embeddings()``: the logits feed a softmax
    over the whole vocabulary and are the most precision-sensitive matmul, as torchao's
    recipes also leave the output layer alone), any linear with an in/out size that is not a
    multiple of 16 (``_scaled_mm`` refuses those) and subclasses of ``nn.Linear`` (LoRA or
    quantized layers, or layers already converted). Call it on the bare model, before
    ``accelerator.prepare()`` and ``torch.compile``. Returns how many layers were converted.
    """
    from torchao.float8 import convert_to_float8_training

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    converted: list[str] = []

    def convertible(module: nn.Module, fqn: str) -> bool:
        if module is head or type(module) is not nn.Linear:
            return False
        if module.in_features % FP8_DIM_MULTIPLE or module.out_features % FP8_DIM_MULTIPLE:
            return False
        converted.append(fqn)
        return True

    convert_to_float8_training(model, module_filter_fn=convertible)
    return len(converted)
