"""The production training step on a simulated H100/H200, device-free: fake CUDA tensors.

No GPU is lent to most tasks, so the 1.2B step's properties are checked here, on the CPU, by
running the real step (the project's model, chunked loss, regional compile, fused AdamW,
clipping, bf16 autocast as accelerate sets it) on ``FakeTensorMode`` tensors that claim to be
on "cuda": shapes, dtypes, kernels and allocations are real, no arithmetic happens. It
asserts what would silently cost speed on a GPU: an fp32 matmul under autocast, attention
that cannot take the flash/cuDNN kernels, a host sync or device-to-host copy, a graph break;
and it prints the allocated memory per micro-batch size, the FLOPs counted against the MFU
formula, and an op-level roofline bound (each kernel max(FLOPs/peak, bytes/bandwidth);
compiled regions at ideal fusion) for an H100 SXM and an H200.

How the CPU build of torch is made to run CUDA autograd: a tiny C++ library registers c10's
header-only ``FakeGuardImpl`` as the CUDA device guard and CUDA hooks that report one
device, so the autograd engine can place its streams; it is built once with
``torch.utils.cpp_extension`` (needs a C++ compiler) and loaded *before* ``import torch``
(torch reads its CUDA hooks once, at import). The compiled layers are traced by dynamo and
AOTAutograd with inductor's decompositions and min-cut partitioner (what inductor saves for
backward), then run node by node on the fake tensors; SDPA's kernel choice follows torch's
sm90 rules (``sdp_choice`` below), since the CPU build has no CUDA chooser.

    python bench/sim_gpu.py                          # production: micro-batch 4, 8, 16
    python bench/sim_gpu.py --layers 2 --seq 512 --micro-batches 2 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (name, dense bf16 FLOP/s, HBM bytes/s)
DEVICES = (("H100 SXM", 989e12, 3.35e12), ("H200", 989e12, 4.8e12))
GIB = 2**30

GUARD_SOURCE = r"""
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_fused_sdp_choice_ops.h>
#include <c10/core/impl/FakeGuardImpl.h>

// The CUDA device guard: c10's fake one (current device and streams as plain fields).
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

namespace {
// CUDA hooks saying one device exists, so at::getAccelerator() is CUDA and the autograd
// engine gives CUDA nodes their (fake) streams.
struct FakeCUDAHooks : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  int getNumGPUs() const override { return 1; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex current_device() const override { return 0; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  void init() const override {}
};
}  // namespace

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks);
}

namespace at::native {
namespace {
// SDPA asks this stub for its kernel on CUDA; the CPU build has none, so it would take the
// math path. Here it asks the _fused_sdp_choice op, which the fake mode answers (sim_gpu.py).
int64_t fake_sdp_choice(const Tensor& q, const Tensor& k, const Tensor& v,
                        const std::optional<Tensor>& mask, double dropout, bool is_causal,
                        std::optional<double> scale, bool enable_gqa) {
  return at::_ops::_fused_sdp_choice::call(q, k, v, mask, dropout, is_causal, scale,
                                           enable_gqa);
}
}  // namespace
REGISTER_CUDA_DISPATCH(_fused_sdp_choice_stub, &fake_sdp_choice)
}  // namespace at::native
"""

_BUILD = """
import sys
from torch.utils.cpp_extension import load
load(name=sys.argv[1], sources=[sys.argv[2]], is_python_module=False,
     build_directory=sys.argv[3], verbose=False)
"""


class GuardUnavailable(RuntimeError):
    """The fake CUDA guard cannot be built or loaded here (the reason is the message)."""


def _torch_lib() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise GuardUnavailable("torch is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def build_guard(cache: Path | None = None) -> Path:
    """The guard library, built once per torch version into ``cache`` (a child process: the
    build imports torch, which must not happen in the process that loads the guard)."""
    if not sys.platform.startswith("linux"):
        raise GuardUnavailable(f"the guard is built for Linux only, not {sys.platform}")
    version = importlib.metadata.version("torch")
    digest = hashlib.sha256((version + GUARD_SOURCE).encode()).hexdigest()[:12]
    name = f"sim_gpu_guard_{digest}"
    cache = cache or Path(tempfile.gettempdir()) / name
    library = cache / f"{name}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / "guard.cpp"
    source.write_text(GUARD_SOURCE)
    out = subprocess.run([sys.executable, "-c", _BUILD, name, str(source), str(cache)],
                         capture_output=True, text=True)
    if out.returncode != 0 or not library.exists():
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise GuardUnavailable("building the fake CUDA guard failed (a C++ compiler and "
                               "ninja are needed): " + " | ".join(tail))
    return library


def load_guard(library: Path) -> None:
    """Load torch's libraries, then the guard, before ``import torch`` (its CUDA hooks are
    read once, at import)."""
    if "torch" in sys.modules:
        raise GuardUnavailable("load_guard must run before torch is imported")
    lib = _torch_lib()
    for name in ("libc10.so", "libtorch_cpu.so"):
        ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
# ---------------------------------------------------------------------------- SDPA's choice

FLASH, EFFICIENT, CUDNN, MATH = "flash", "efficient", "cudnn", "math"
_SDP_ENUM = {MATH: 0, FLASH: 1, EFFICIENT: 2, CUDNN: 3}
_SDP_CHOICES: list[str] = []  # every choice made in this process since the last clear()


def sdp_choice(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
               scale=None, enable_gqa=False) -> str:
    """The kernel torch's ``_fused_sdp_choice`` picks on sm90, from its checks (flash first):
    flash needs no explicit mask, fp16/bf16, 4-D q/k/v with equal head dims <= 256, a unit
    last-dim stride, and causal only with equal query and key lengths; cuDNN (second) the
    same with head dim <= 128 and a multiple of 8; memory-efficient takes masks and fp32."""
    import torch

    dims = {t.shape[-1] for t in (query, key, value)}
    dense = all(t.dim() == 4 and t.stride(-1) == 1 for t in (query, key, value))
    half = query.dtype in (torch.float16, torch.bfloat16)
    square = not is_causal or query.shape[-2] == key.shape[-2]
    head = max(dims)
    same = len(dims) == 1 and query.dtype == key.dtype == value.dtype
    if (torch.backends.cuda.flash_sdp_enabled() and attn_mask is None and dense and half
            and same and head <= 256 and square):
        return FLASH
    if (torch.backends.cuda.cudnn_sdp_enabled() and attn_mask is None and dense and half
            and same and head <= 128 and head % 8 == 0 and square):
        return CUDNN
    if torch.backends.cuda.mem_efficient_sdp_enabled() and dense and same:
        return EFFICIENT
    return MATH


def _register_sdp_choice(choices: list[str]) -> None:
    """Every fake mode (dynamo's too) asks ``sdp_choice``; each answer is recorded."""
    import torch
    from torch._subclasses import fake_impls

    op = torch.ops.aten._fused_sdp_choice.default
    if op in fake_impls.op_implementations_dict:
        return

    @fake_impls.register_op_impl(op)
    def _choice(fake_mode, func, *args, **kwargs):
        choice = sdp_choice(*args, **kwargs)
        choices.append(choice)
        return _SDP_ENUM[choice]


def _pretend_cuda_amp() -> None:
    """torch.autocast("cuda") checks for a real device; accelerate's bf16 autocast needs it."""
    import torch
    import torch.cuda.amp.common as amp_common

    amp_common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *_, **__: True


# ---------------------------------------------------------------------------- kernel costs

EXTERN = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "convolution_backward",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
          "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
          "_scaled_dot_product_efficient_attention",
          "_scaled_dot_product_efficient_attention_backward", "embedding_dense_backward"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "dot", "mv", "addmv"}
ATTENTION = {name.removeprefix("_scaled_dot_product_").removesuffix("_attention")
             for name in EXTERN if name.startswith("_scaled_dot_product_")
             and not name.endswith("backward")}
FREE = {"detach", "alias", "view", "_unsafe_view", "t", "transpose", "expand", "permute",
        "slice", "select", "unsqueeze", "squeeze", "as_strided", "split", "unbind", "lift_fresh",
        "_reshape_alias", "empty", "empty_strided", "empty_like", "new_empty",
        "new_empty_strided", "split_with_sizes", "_local_scalar_dense", "getitem",
        "reshape", "flatten", "unflatten", "clone_meta", "sym_size", "sym_stride", "sym_numel"}
SYNCS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item", "masked_select",
         "unique", "_unique2", "unique_consecutive"}


def _tensors(value) -> list:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _opname(target) -> str:
    """aten.mm.default -> "mm"; metadata queries (prim.device, ...) count as "getitem": free."""
    if getattr(target, "namespace", "") == "prim":
        return "getitem"
    return getattr(target, "_opname", getattr(target, "__name__", str(target)))


def _flops(func, args, kwargs, out) -> int:
    """FLOPs of one op by torch's own FlopCounterMode formulas (0 where it has none)."""
    from torch.utils.flop_counter import flop_registry

    counter = flop_registry.get(getattr(func, "_overloadpacket", None))
    return int(counter(*args, **kwargs, out_val=out)) if counter else 0


CAUSAL_BLOCK = 128  # flash/cuDNN tile edge on sm90: the diagonal tiles run whole


def causal_fraction(func, args, kwargs) -> float:
    """The share of an attention kernel's FlopCounter FLOPs it executes: a causal flash or
    cuDNN kernel (``is_causal``) skips the tiles above the diagonal, so of T/B x T/B tiles it
    runs (T/B)(T/B + 1)/2, i.e. (T + B) / 2T of the unmasked count; 1 for everything else."""
    name = _opname(func)
    if not name.startswith("_scaled_dot_product_"):
        return 1.0
    names = [a.name for a in func._schema.arguments]
    values = dict(zip(names, args, strict=False)) | kwargs
    if not values.get("is_causal"):
        return 1.0
    seq = values["query"].shape[-2]
    return min(1.0, (seq + CAUSAL_BLOCK) / (2 * seq))


def _kernel_flops(func, args, kwargs, out) -> int:
    """The FLOPs a kernel executes (the roofline's): FlopCounter's, causal attention halved."""
    return int(_flops(func, args, kwargs, out) * causal_fraction(func, args, kwargs))


def _eager_bytes(func, args, kwargs, out) -> int:
    """An eager kernel's traffic: its tensor inputs read, what it writes (new outputs, or
    the arguments it mutates)."""
    if _opname(func) in FREE or getattr(func, "is_view", False):
        return 0
    schema = func._schema
    written = 0
    values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
    for arg, value in zip(schema.arguments, values, strict=False):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written += _nbytes(value)
    fresh = all(r.alias_info is None for r in schema.returns)
    return _nbytes((args, kwargs)) + written + (_nbytes(out) if fresh else 0)


def graph_kernels(gm) -> list[tuple[int, int, int]]:
    """(FLOPs, bytes, chunk-sized tensors touched) per kernel of an aten FX graph at ideal
    fusion: matmuls and attention are library kernels reading their inputs and writing their
    outputs; every connected group of the other ops is one kernel that reads what it takes
    from outside once and writes what leaves it once; views are free."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    kind = {n: ("extern" if _opname(n.target) in EXTERN else "free"
                if _opname(n.target) in FREE or getattr(n.target, "is_view", False)
                else "fused") for n in nodes}
    parent = {n: n for n in nodes if kind[n] == "fused"}

    def root(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def source(n):  # through free views to the fused op that made the tensor, if any
        while n.op == "call_function" and kind[n] == "free" and n.all_input_nodes:
            n = n.all_input_nodes[0]
        return n if n in parent else None

    for n in parent:
        for m in n.all_input_nodes:
            s = source(m)
            if s is not None:
                parent[root(s)] = root(n)
    groups: dict = {}
    for n in parent:
        groups.setdefault(root(n), []).append(n)
    kernels = [_group_cost(members, source, root) for members in groups.values()]
    for n in nodes:
        if kind[n] == "extern":
            ins = [m.meta.get("val") for m in n.all_input_nodes]
            out = n.meta.get("val")
            args = [a.meta.get("val") if hasattr(a, "meta") else a for a in n.args]
            kw = {k: v.meta.get("val") if hasattr(v, "meta") else v for k, v in n.kwargs.items()}
            kernels.append((_kernel_flops(n.target, args, kw, out), _nbytes(ins) + _nbytes(out),
                            0))
    return kernels


def _group_cost(members, source, root) -> tuple[int, int, int]:
    inside = set(members)
    reads, writes = {}, {}
    for n in members:
        for m in n.all_input_nodes:
            s = source(m)
            if s is None or s not in inside:
                reads[m] = m.meta.get("val")
        if any(source(u) is None or source(u) not in inside for u in _consumers(n)):
            writes[n] = n.meta.get("val")
    touched = [t for v in list(reads.values()) + list(writes.values()) for t in _tensors(v)]
    big = sum(1 for t in touched if _is_loss_chunk(t))
    return 0, _nbytes(list(reads.values())) + _nbytes(list(writes.values())), big


RECOMPUTE_CASTS = [False]  # --recompute-casts: compile_model's recompute_casts, measured
_LOSS_CHUNK = [(-1, -1)]  # (elements, vocab) of a loss chunk's logits (set per run)


def _is_loss_chunk(t) -> bool:
    """A loss chunk's logits or their gradient: that many elements, vocab-sized rows (the LM
    head's weight has as many elements when a chunk's tokens equal the hidden size)."""
    elements, vocab = _LOSS_CHUNK[0]
    return t.numel() == elements and t.dim() > 0 and t.shape[-1] == vocab


def _consumers(n) -> list:
    """Users, looking through free views (a view's users consume the viewed tensor)."""
    out = []
    for u in n.users:
        if u.op == "call_function" and (_opname(u.target) in FREE
                                        or getattr(u.target, "is_view", False)):
            out.extend(_consumers(u) or [u])
        else:
            out.append(u)
    return out


# ---------------------------------------------------------------------------- the fake device

class Recorder:
    """What the step did on the fake GPU: allocations, kernels, FLOPs and the violations."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.allocated = self.peak = 0
        self.phase = "setup"
        self.region: str | None = None  # a compiled graph running: its cost is static
        self.kernels: dict[str, list[tuple[int, int, int]]] = {}
        self.flops = 0
        self.matmuls: dict[str, int] = {}
        self.attention: dict[str, int] = {}
        self.problems: list[str] = []
        self.graphs: dict[str, int] = {}
        self.saved: dict[str, list[str]] = {}

    def reset(self) -> None:
        """A new step: counts restart, the memory already allocated stays."""
        self.peak = self.allocated
        self.kernels, self.flops, self.matmuls, self.attention = {}, 0, {}, {}
        self.problems = []

    def allocate(self, storage) -> None:
        import weakref

        key = id(storage)
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.allocated += size
        self.peak = max(self.peak, self.allocated)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.allocated -= self.live.pop(key, 0)

    def op(self, func, args, kwargs, out) -> None:
        """One aten op on the fake device (eager or inside a compiled graph)."""
        name = _opname(func)
        cuda_in = [t for t in _tensors((args, kwargs)) if t.device.type == "cuda"]
        outs = _tensors(out)
        for t in outs:
            if t.device.type == "cuda":
                self.allocate(t.untyped_storage())
        if not cuda_in and not any(t.device.type == "cuda" for t in outs):
            return
        if name in SYNCS:
            self.problems.append(f"host sync: aten.{name} in {self.phase}")
        if any(t.device.type == "cpu" for t in outs) or (
                name == "copy_" and args[0].device.type == "cpu"):
            self.problems.append(f"device-to-host copy: aten.{name} in {self.phase}")
        if name in MATMULS:
            dtypes = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in cuda_in}))
            self.matmuls[dtypes] = self.matmuls.get(dtypes, 0) + 1
            if any(t.dtype == __import__("torch").float32 for t in cuda_in):
                shapes = [tuple(t.shape) for t in cuda_in]
                self.problems.append(f"fp32 matmul aten.{name} {shapes} in {self.phase}")
        kind = name.removeprefix("_scaled_dot_product_").removesuffix("_attention")
        if kind in ATTENTION:
            self.attention[kind] = self.attention.get(kind, 0) + 1
        self.flops += _flops(func, args, kwargs, out)
        if self.region is None:
            big = 0 if name in MATMULS else sum(1 for t in cuda_in + outs
                                                if _is_loss_chunk(t))
            cost = (_kernel_flops(func, args, kwargs, out), _eager_bytes(func, args, kwargs, out),
                    big)
            if cost[1] or cost[0]:
                self.kernels.setdefault(self.phase, []).append(cost)


def sim_mode(recorder: Recorder):
    """A FakeTensorMode that tells ``recorder`` about every op it runs. Still a fake mode, so
    dynamo accepts it as the ambient one (any other dispatch mode would stop compilation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class SimMode(FakeTensorMode):
        def dispatch(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = super().dispatch(func, types, args, kwargs)
            recorder.op(func, args, kwargs, out)
            return out

    return SimMode(allow_non_fake_inputs=False)


def sim_backend(recorder: Recorder, label: str):
    """A torch.compile backend: dynamo's graph through AOTAutograd as inductor would (its
    decompositions, the min-cut partitioner), each graph costed at ideal fusion and then run
    node by node, freeing values after their last use as compiled code does."""
    import torch
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def compiler(kind: str):
        def compile_graph(gm, example_inputs):
            kernels = graph_kernels(gm)
            if kind == "bwd":
                recorder.saved[label] = [_describe(n.meta.get("val")) for n in gm.graph.nodes
                                         if n.op == "placeholder"
                                         and not n.name.startswith("tangents")]

            def run(args):
                outer, recorder.region = recorder.region, f"{label} {kind} (compiled)"
                try:
                    return torch.fx.Interpreter(gm, garbage_collect_values=True).boxed_run(args)
                finally:
                    recorder.kernels.setdefault(recorder.region, []).extend(kernels)
                    recorder.region = outer

            run._boxed_call = True
            return run
        return compile_graph

    aot = aot_autograd(fw_compiler=compiler("fwd"), bw_compiler=compiler("bwd"),
                       inference_compiler=compiler("fwd"),
                       partition_fn=min_cut_rematerialization_partition,
                       decompositions=select_decomp_table())

    def backend(gm, example_inputs):
        recorder.graphs[label] = recorder.graphs.get(label, 0) + 1
        return aot(gm, example_inputs)

    return backend


def _describe(value) -> str:
    tensors = _tensors(value)
    if not tensors:
        return "scalar"
    t = tensors[0]
    text = f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')} {_nbytes(t) / 2**20:.1f} MiB"
    held = t.untyped_storage().nbytes()
    return text if held <= _nbytes(t) else f"{text} (a view holding {held / 2**20:.1f} MiB)"


# ---------------------------------------------------------------------------- the step

def build(preset_name: str, micro_batch: int, accumulation: int, layers: int, seq: int,
          recorder: Recorder):
    """The engine's set-up on the fake GPU: build_model, fused AdamW, accelerate's bf16
    autocast around forward (as ``prepare`` does), then regional compile."""
    from dataclasses import replace

    import torch
    from accelerate.utils import convert_outputs_to_fp32

    from configs.training_config import preset
    from utils.torch_engine import chunked_ce
    from utils.torch_engine.compiling import compile_model
    from utils.torch_engine.model import build_model
    from utils.torch_engine.optim import build_adamw

    config = preset(preset_name)
    config = replace(config, seq_len=seq or config.seq_len,
                     per_device_train_batch_size=micro_batch,
                     gradient_accumulation_steps=accumulation)
    with torch.device("cuda"):
        model = build_model(config, None)
    if layers:
        model.gpt_neox.layers = model.gpt_neox.layers[:layers]
        model.config.num_hidden_layers = layers
    optimizer = build_adamw(model, config.learning_rate, config.weight_decay,
                            (config.adam_beta1, config.adam_beta2), config.adam_epsilon)
    if config.mixed_precision == "bf16":
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        model.forward = convert_outputs_to_fp32(autocast(model.forward))
    if config.compile:
        compile_model(model, config.compile_scope, backend=sim_backend(recorder, "layers"),
                      recompute_casts=RECOMPUTE_CASTS[0] and config.mixed_precision != "no")
        if hasattr(chunked_ce, "LOSS_BACKEND"):
            chunked_ce.LOSS_BACKEND = sim_backend(recorder, "loss")
    return config, model, optimizer


def optimizer_step(model, optimizer, config, recorder: Recorder) -> None:
    """What TorchEngine.accumulate/update run for one optimizer step: the micro-batches'
    forward and backward (the loss divided by the accumulation, as accelerate does), clipping,
    the fused AdamW step with ``found_inf``, the loss kept on the device."""
    import torch

    from utils.torch_engine.losses import causal_lm_loss

    accumulation = config.gradient_accumulation_steps
    pending = torch.zeros((), device="cuda")
    shape = (config.per_device_train_batch_size, config.seq_len + 1)
    for _ in range(accumulation):
        recorder.phase = "input"
        windows = torch.randint(0, model.config.vocab_size, shape).to("cuda", non_blocking=True)
        recorder.phase = "forward"
        loss = causal_lm_loss(model, windows)
        recorder.phase = "backward"
        (loss / accumulation).backward()
        pending = pending + loss.detach() / accumulation
    recorder.phase = "clip"
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    recorder.phase = "optimizer"
    bad = ~torch.isfinite(norm)
    optimizer.found_inf = bad.float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.where(bad, 0.0, pending)
    recorder.phase = "idle"


def _label_loss(recorder: Recorder):
    """The chunked loss's eager ops get their own line in the roofline."""
    from utils.torch_engine import model as model_module

    inner = model_module.chunked_cross_entropy

    def labelled(*args, **kwargs):
        outer, recorder.phase = recorder.phase, "loss"
        try:
            return inner(*args, **kwargs)
        finally:
            recorder.phase = outer

    model_module.chunked_cross_entropy = labelled
    return lambda: setattr(model_module, "chunked_cross_entropy", inner)


def run_size(preset_name: str, micro_batch: int, sequences: int, layers: int,
             seq: int) -> dict:
    """Two optimizer steps at one micro-batch size (the first compiles and creates the
    AdamW state); the second is measured."""
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    recorder = Recorder()
    choices = _SDP_CHOICES
    choices.clear()
    _register_sdp_choice(choices)
    restore = _label_loss(recorder)
    try:
        with sim_mode(recorder):
            config, model, optimizer = build(preset_name, micro_batch,
                                             max(1, sequences // micro_batch), layers, seq,
                                             recorder)
            vocab = model.config.vocab_size
            _LOSS_CHUNK[0] = (min(config.loss_chunk_tokens or 1 << 40,
                                  micro_batch * config.seq_len) * vocab, vocab)
            optimizer_step(model, optimizer, config, recorder)
            recorder.reset()
            resident = recorder.allocated
            optimizer_step(model, optimizer, config, recorder)
    finally:
        restore()
    return summarize(config, model.config, recorder, choices, resident)


def roofline(kernels: dict[str, list[tuple[int, int, int]]], peak: float,
             bandwidth: float) -> dict[str, float]:
    """Seconds per phase: each kernel max(FLOPs / peak, bytes / bandwidth), summed."""
    return {phase: sum(max(f / peak, b / bandwidth) for f, b, _ in costs)
            for phase, costs in kernels.items()}


def summarize(config, hf_config, recorder: Recorder, choices: list[str],
              resident: int) -> dict:
    """The figures of one measured step, and what fails the check."""
    import torch

    from configs.model_config import count_parameters
    from utils.loop.metrics import flops_per_token

    layers, hidden, vocab = (hf_config.num_hidden_layers, hf_config.hidden_size,
                             hf_config.vocab_size)
    micro_batches = config.gradient_accumulation_steps
    tokens = micro_batches * config.per_device_train_batch_size * config.seq_len
    _, non_embedding = count_parameters(hf_config)
    formula = flops_per_token(non_embedding, layers, hidden, config.seq_len, vocab * hidden)
    causal = formula - 6.0 * layers * hidden * config.seq_len  # attention scores halved
    chunks = micro_batches * -(-config.per_device_train_batch_size * config.seq_len
                               // (config.loss_chunk_tokens or 1 << 40))
    loss_touches = sum(big for phase, costs in recorder.kernels.items()
                       if phase.startswith("loss") for _, _, big in costs)
    devices = {}
    for name, peak, bandwidth in DEVICES:
        phases = roofline(recorder.kernels, peak, bandwidth)
        seconds = sum(phases.values())
        devices[name] = {"step_ms": seconds * 1e3, "mfu_bound": formula * tokens / seconds / peak,
                         "causal_mfu_bound": causal * tokens / seconds / peak,
                         "phases_ms": {k: v * 1e3 for k, v in sorted(phases.items())}}
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    result = {
        "micro_batch": config.per_device_train_batch_size, "accumulation": micro_batches,
        "seq_len": config.seq_len, "layers": layers, "tokens_per_step": tokens,
        "peak_allocated_gib": recorder.peak / GIB, "resident_gib": resident / GIB,
        "flops_counted_per_token": recorder.flops / tokens, "flops_formula_per_token": formula,
        "flops_causal_per_token": causal, "matmuls": recorder.matmuls,
        "attention_kernels": recorder.attention, "sdp_choices": sorted(set(choices)),
        "graph_breaks": breaks, "compiled_graphs": dict(recorder.graphs),
        "saved_per_layer": recorder.saved.get("layers", []),
        "loss_passes_per_chunk": loss_touches / max(chunks, 1), "devices": devices,
        "problems": recorder.problems}
    result["failures"] = _failures(result, layers * micro_batches)
    return result


def _failures(r: dict, attention_calls: int) -> list[str]:
    failures = list(dict.fromkeys(r["problems"]))[:20]
    if any(dtype != "bfloat16" for dtype in r["matmuls"]):
        failures.append(f"matmuls not all bf16: {r['matmuls']}")
    fast = r["attention_kernels"].get(FLASH, 0) + r["attention_kernels"].get(CUDNN, 0)
    if fast != attention_calls or set(r["attention_kernels"]) - {FLASH, CUDNN}:
        failures.append(f"attention kernels {r['attention_kernels']}, expected "
                        f"{attention_calls} flash/cuDNN calls")
    if not r["sdp_choices"] or set(r["sdp_choices"]) - {FLASH, CUDNN}:
        failures.append(f"SDPA would choose {r['sdp_choices']}")
    if r["graph_breaks"]:
        failures.append(f"{r['graph_breaks']} graph breaks")
    if r["compiled_graphs"].get("layers", 0) != 1:
        failures.append(f"layer graphs compiled: {r['compiled_graphs']} (one for all expected)")
    held = [s for s in r["saved_per_layer"] if "a view holding" in s]
    if held:
        failures.append(f"saved for backward as views of larger buffers: {held}")
    if r["loss_passes_per_chunk"] > 2:
        failures.append(f"{r['loss_passes_per_chunk']:.1f} passes over each loss chunk's "
                        f"logits (at most 2: read the logits, write the gradient)")
    return failures


def simulate(preset_name: str, sizes: list[int], sequences: int, layers: int = 0,
             seq: int = 0) -> list[dict]:
    """Every micro-batch size's figures, each in the same fresh set-up."""
    _pretend_cuda_amp()
    return [run_size(preset_name, size, sequences, layers, seq) for size in sizes]


def report(results: list[dict]) -> None:
    """The tables the README and bench/RESULTS.md quote."""
    first = results[0]
    print(f"simulated, device-free: {first['layers']} layers, seq {first['seq_len']}, "
          f"{first['tokens_per_step']} tokens per optimizer step")
    print(f"FLOPs/token: counted {first['flops_counted_per_token']:.4g}, MFU formula "
          f"(6N + 12LHT) {first['flops_formula_per_token']:.4g}, causal-aware (6N + 6LHT) "
          f"{first['flops_causal_per_token']:.4g}")
    names = [name for name, _, _ in DEVICES]
    print("(bound: causal attention kernels execute (T + 128) / 2T of their unmasked FLOPs; "
          "MFU <= formula / causal-aware: the same bound with 6N + 12LHT / 6N + 6LHT FLOPs)")
    print("| micro-batch x accumulation | allocated peak GiB | "
          + " | ".join(f"{n} step >= ms | {n} MFU <= formula / causal" for n in names) + " |")
    print("|---|---:|" + "---:|---:|" * len(names))
    for r in results:
        cells = " | ".join(f"{r['devices'][n]['step_ms']:.0f} | "
                           f"{100 * r['devices'][n]['mfu_bound']:.1f}% / "
                           f"{100 * r['devices'][n]['causal_mfu_bound']:.1f}%" for n in names)
        print(f"| {r['micro_batch']} x {r['accumulation']} | {r['peak_allocated_gib']:.1f} | "
              f"{cells} |")
    for r in results:
        phases = r["devices"][names[0]]["phases_ms"]
        print(f"micro-batch {r['micro_batch']}, {names[0]} bound by phase (ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
        print(f"  matmuls {r['matmuls']}, attention {r['attention_kernels']} "
              f"(SDPA choice {r['sdp_choices']}), graph breaks {r['graph_breaks']}, "
              f"compiled graphs {r['compiled_graphs']}, loss passes per chunk "
              f"{r['loss_passes_per_chunk']:.1f}, weights + optimizer "
              f"{r['resident_gib']:.1f} GiB")
    print("saved for backward per layer (micro-batch "
          f"{first['micro_batch']}): " + "; ".join(first["saved_per_layer"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="production")
    parser.add_argument("--layers", type=int, default=0, help="keep this many layers (0: all)")
    parser.add_argument("--seq", type=int, default=0, help="sequence length (0: the preset's)")
    parser.add_argument("--micro-batches", default="4,8,16",
                        help="micro-batch sizes; each step has --sequences sequences")
    parser.add_argument("--sequences", type=int, default=16, help="sequences per step")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--no-check", action="store_true", help="report, do not assert")
    parser.add_argument("--eager-loss", action="store_true",
                        help="the chunked loss unfused (its CPU path), for comparison")
    parser.add_argument("--recompute-casts", action="store_true",
                        help="the compiled layers recompute their weights' bf16 casts in "
                             "backward instead of saving them (compile_model's option)")
    args = parser.parse_args()
    try:
        load_guard(build_guard())
    except GuardUnavailable as err:
        print(f"sim_gpu: cannot simulate CUDA here: {err}", file=sys.stderr)
        sys.exit(3)
    sys.path.insert(0, str(REPO))
    if args.eager_loss:
        from utils.torch_engine import chunked_ce

        chunked_ce.FUSED_DEVICES = ()
    RECOMPUTE_CASTS[0] = args.recompute_casts
    sizes = [int(s) for s in args.micro_batches.split(",")]
    results = simulate(args.preset, sizes, args.sequences, layers=args.layers,
                       seq=args.seq)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.no_check:
        failures = [f"micro-batch {r['micro_batch']}: {f}" for r in results
                    for f in r["failures"]]
        if failures:
            print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
            sys.exit(1)
        print("checks passed: bf16 matmuls only, flash/cuDNN attention only, no host sync, "
              "no graph break, one compile for all layers")


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_VERBOSE", "0")
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
