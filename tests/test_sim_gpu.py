"""bench/sim_gpu.py: the production step on fake CUDA tensors passes its checks.

Two layers at sequence 512 (micro-batch 2, two micro-batches per step) instead of 24 at
2048, so it runs in seconds on two cores; the full production figures come from the bench
itself (``python bench/sim_gpu.py``, bench/RESULTS.md). Skipped where the fake CUDA guard
cannot be built (no C++ compiler or ninja, not Linux).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import finish

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sim_gpu", REPO / "bench" / "sim_gpu.py")
assert _spec and _spec.loader
sim_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim_gpu)  # stdlib only at import: torch comes in the child


def _guard() -> Path:
    try:
        return sim_gpu.build_guard()
    except sim_gpu.GuardUnavailable as err:
        pytest.skip(f"no fake CUDA device here: {err}")


def _simulate(tmp_path: Path, *flags: str,
              micro_batch: int = 2) -> tuple[subprocess.CompletedProcess, list[dict]]:
    _guard()
    out = tmp_path / "sim.json"
    run = finish([sys.executable, str(REPO / "bench" / "sim_gpu.py"), "--layers", "2",
                  "--seq", "512", "--micro-batches", str(micro_batch),
                  "--sequences", str(2 * micro_batch), "--json", str(out), *flags],
                 cwd=REPO,
                 env={**os.environ, "TMPDIR": str(tmp_path)})
    return run, json.loads(out.read_text()) if out.exists() else []


@pytest.mark.slow
def test_the_production_step_passes_on_a_simulated_gpu(tmp_path: Path):
    # Micro-batch 4 x 512: a loss chunk's 2048 tokens equal the hidden size, so the LM head's
    # weight has as many elements as a chunk's logits and must not count as a pass over them.
    run, results = _simulate(tmp_path, micro_batch=4)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checks passed" in run.stdout
    (r,) = results
    assert r["failures"] == [] and r["problems"] == []
    assert set(r["matmuls"]) == {"bfloat16"}
    # 2 layers x 2 micro-batches, flash forward each time; SDPA chose flash when compiled.
    assert r["attention_kernels"] == {"flash": 4} and r["sdp_choices"] == ["flash"]
    assert r["graph_breaks"] == 0 and r["compiled_graphs"] == {"layers": 1, "loss": 1}
    assert r["loss_passes_per_chunk"] == 2  # the fused loss: read the logits, write the grad
    assert not any("view holding" in saved for saved in r["saved_per_layer"])
    # FLOPs counted by torch's formulas agree with the MFU formula's 6N + 12LHT within 1%.
    assert abs(r["flops_counted_per_token"] / r["flops_formula_per_token"] - 1) < 0.01
    assert 0 < r["resident_gib"] < r["peak_allocated_gib"]
    for device in r["devices"].values():
        assert 0 < device["mfu_bound"] < 1 and device["step_ms"] > 0
        # The same bound over the causal-aware FLOPs (6N + 6LHT): lower by their ratio.
        assert device["causal_mfu_bound"] == pytest.approx(
            device["mfu_bound"] * r["flops_causal_per_token"] / r["flops_formula_per_token"])
    h100, h200 = r["devices"]["H100 SXM"], r["devices"]["H200"]
    assert h200["step_ms"] < h100["step_ms"]  # same peak, more bandwidth


@pytest.mark.slow
def test_the_unfused_loss_fails_the_check(tmp_path: Path):
    """The eager chunked loss (the CPU's path) makes many passes over each chunk's logits:
    the check says so and exits 1."""
    run, results = _simulate(tmp_path, "--eager-loss")
    assert run.returncode == 1
    (r,) = results
    assert r["loss_passes_per_chunk"] > 10
    assert any("passes over each loss chunk" in f for f in r["failures"])


def test_causal_attention_kernels_are_costed_for_the_tiles_they_run():
    """A causal flash call at T = 2048 runs (T + 128) / 2T of FlopCounter's unmasked count;
    a non-causal call, or any other op, all of it."""
    pytest.importorskip("torch")
    code = """
import torch, json, sys
sys.path.insert(0, sys.argv[1])
import sim_gpu
q = torch.empty(1, 16, 2048, 128, dtype=torch.bfloat16, device="meta")
flash = torch.ops.aten._scaled_dot_product_flash_attention.default
print(json.dumps([sim_gpu.causal_fraction(flash, (q, q, q, 0.0, True), {}),
                  sim_gpu.causal_fraction(flash, (q, q, q), {"is_causal": False}),
                  sim_gpu.causal_fraction(torch.ops.aten.mm.default, (q, q), {})]))
"""
    run = finish([sys.executable, "-c", code, str(REPO / "bench")], cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == [(2048 + 128) / 4096, 1.0, 1.0]


def test_sdpa_choice_follows_the_sm90_rules():
    """Flash without a mask for bf16 and head dims up to 256; a mask, fp32, a causal
    non-square shape or head dim 512 rule it out (torch would pick another kernel)."""
    pytest.importorskip("torch")
    code = """
import torch, json, sys
sys.path.insert(0, sys.argv[1])
import sim_gpu
def t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")
q = t(2, 16, 64, 128)
out = [sim_gpu.sdp_choice(q, q, q, is_causal=True),
       sim_gpu.sdp_choice(q, q, q, attn_mask=t(64, 64, dtype=torch.bool)),
       sim_gpu.sdp_choice(t(2, 16, 64, 128, dtype=torch.float32),
                          *[t(2, 16, 64, 128, dtype=torch.float32)] * 2),
       sim_gpu.sdp_choice(t(2, 16, 8, 128), q, q, is_causal=True),
       sim_gpu.sdp_choice(t(2, 16, 64, 512), t(2, 16, 64, 512), t(2, 16, 64, 512))]
print(json.dumps(out))
"""
    run = finish([sys.executable, "-c", code, str(REPO / "bench")], cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == ["flash", "efficient", "efficient", "efficient",
                                      "efficient"]


def test_recomputed_weight_casts_train_alike_and_are_not_saved():
    """compile_model(recompute_casts=True) under bf16 autocast: the layer graph's backward
    gets the fp32 weights (resident anyway), no bf16 copy of a weight, and loss and
    gradients equal the layers compiled without it (the same partitioner inductor uses)."""
    torch = pytest.importorskip("torch")
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from configs.training_config import preset
    from utils.torch_engine.compiling import compile_model
    from utils.torch_engine.model import build_model

    def run(recompute: bool) -> tuple[float, dict, list]:
        saved: list = []

        def keep_fwd(gm, _inputs):
            return make_boxed_func(gm.forward)

        def keep_bwd(gm, _inputs):
            saved.extend(n.meta["val"] for n in gm.graph.nodes
                         if n.op == "placeholder" and not n.name.startswith("tangents"))
            return make_boxed_func(gm.forward)

        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model(preset("smoke"), {"vocab_size": 256})
        backend = aot_autograd(fw_compiler=keep_fwd, bw_compiler=keep_bwd,
                               partition_fn=min_cut_rematerialization_partition)
        compile_model(model, "layers", backend=backend, recompute_casts=recompute)
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}, saved

    loss, grads, saved = run(False)
    loss_r, grads_r, saved_r = run(True)
    weights = {(256, 256), (768, 256), (1024, 256), (256, 1024)}  # h256: dense, QKV, MLP

    def saved_weights(tensors: list, dtype) -> set:
        return {tuple(t.shape) for t in tensors if t.dtype == dtype} & weights

    assert saved_weights(saved, torch.bfloat16) == weights  # autocast's casts, saved
    assert saved_weights(saved_r, torch.bfloat16) == set()
    assert saved_weights(saved_r, torch.float32) == weights  # the resident fp32 weights
    assert loss_r == loss
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, atol=0, rtol=0)
