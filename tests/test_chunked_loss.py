"""The chunked LM-head cross-entropy: the plain path's loss and gradients without its logits.

Checked against ``F.cross_entropy(h @ W.T)`` and against the whole-logits model path: values
and gradients in fp32, under bf16 autocast, without autograd, traced by torch.compile, under
DDP; its largest tensor is chunk x vocab, not tokens x vocab; checkpoints stay plain GPT-NeoX.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

from configs.training_config import preset
from utils.stages.examples import IGNORE
from utils.torch_engine import chunked_ce
from utils.torch_engine.chunked_ce import chunked_cross_entropy
from utils.torch_engine.losses import causal_lm_loss
from utils.torch_engine.model import CAUSAL_ATTENTION, build_model

VOCAB = 2048  # wide enough that tokens x vocab is the model's largest tensor below


def _problem(n: int = 45, d: int = 16, v: int = 96, seed: int = 0):
    """Hidden states, head weight (both requiring grad) and targets with ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::4] = IGNORE
    return hidden, weight, targets


def _reference(hidden, weight, targets) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE,
                           reduction="sum")


def _loss_and_grads(fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def _model(chunk: int, attention: str = "causal") -> torch.nn.Module:
    torch.manual_seed(0)
    config = replace(preset("smoke"), loss_chunk_tokens=chunk, attention=attention)
    return build_model(config, {"vocab_size": VOCAB})


def _windows(batch: int = 3, seq: int = 33) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("chunk", [7, 16, 45, 1000, 0])
def test_loss_and_gradients_equal_the_reference_in_fp32(chunk):
    """Chunks that divide N, that do not, one chunk, one larger than N; ignored targets."""
    hidden, weight, targets = _problem()
    got = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk) * 0.5,
                          hidden, weight, targets)
    want = _loss_and_grads(lambda h, w, t: _reference(h, w, t) * 0.5, hidden, weight, targets)
    assert hidden.grad[::4].abs().max() == 0  # ignored rows get no gradient
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [7, 16, 45, 1000])
def test_the_fused_path_equals_the_reference(monkeypatch, chunk):
    """The compiled per-chunk softmax gradient (CUDA's path), traced by dynamo and AOTAutograd
    here on the CPU (aot_eager: the graph inductor would fuse, run op by op)."""
    monkeypatch.setattr(chunked_ce, "LOSS_BACKEND", "aot_eager")
    torch._dynamo.reset()
    hidden, weight, targets = _problem()
    got = _loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk, fused=True),
                          hidden, weight, targets)
    want = _loss_and_grads(_reference, hidden, weight, targets)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_and_in_place_softmax_gradients_agree():
    gen = torch.Generator().manual_seed(3)
    raw = torch.randn(33, 96, generator=gen) * 4
    targets = torch.randint(0, 96, (33,), generator=gen)
    targets[::3] = IGNORE
    fused = chunked_ce.softmax_grad(raw, targets)
    in_place = chunked_ce._softmax_grad_in_place(raw.clone(), targets)
    for a, b in zip(fused, in_place, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert fused[1][::3].abs().max() == 0


def test_the_fused_path_is_cuda_only_by_default():
    """The CPU keeps the eager in-place path: compiling there is slow and gains nothing."""
    assert chunked_ce.FUSED_DEVICES == ("cuda",)
    assert not chunked_ce._fuse_by_default(torch.zeros(2, 2))


def test_only_the_inputs_that_need_it_get_a_gradient():
    hidden, weight, targets = _problem()
    weight.requires_grad_(False)
    chunked_cross_entropy(hidden, weight, targets, 8).backward()
    ref = hidden.detach().clone().requires_grad_()
    _reference(ref, weight, targets).backward()
    torch.testing.assert_close(hidden.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_model_loss_and_every_parameter_gradient_equal_the_whole_logits_path():
    chunked, plain = _model(chunk=40), _model(chunk=0)  # 3 x 32 = 96 tokens: 40, 40, 16
    plain.load_state_dict(chunked.state_dict())
    windows = _windows()
    losses = [causal_lm_loss(m, windows) for m in (chunked, plain)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(chunked.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_labels_mean_what_they_mean_to_transformers():
    """``labels`` are shifted inside (as transformers does), ``shift_labels`` are not."""
    chunked = _model(chunk=40)
    stock = transformers.GPTNeoXForCausalLM(chunked.config)
    stock.load_state_dict(chunked.state_dict())
    windows = _windows()
    labels = windows.clone()
    labels[0, :10] = IGNORE
    with torch.no_grad():
        shifted = labels[:, 1:].contiguous()
        for kwargs in ({"labels": labels}, {"labels": labels, "shift_labels": shifted}):
            ids = windows if "shift_labels" not in kwargs else windows[:, :-1]
            ours = chunked(input_ids=ids, use_cache=False, **kwargs)
            theirs = stock(input_ids=ids, use_cache=False, **kwargs)
            assert ours.logits is None
            torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)
        # No labels: transformers' forward, logits and all.
        torch.testing.assert_close(chunked(input_ids=windows).logits,
                                   stock(input_ids=windows).logits, rtol=0, atol=1e-5)


def test_bf16_autocast_loss_and_gradients_are_close_to_the_plain_path():
    chunked, plain = _model(chunk=40), _model(chunk=0)
    plain.load_state_dict(chunked.state_dict())
    windows = _windows()
    losses = []
    for model in (chunked, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(causal_lm_loss(model, windows))
        losses[-1].backward()
    assert losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-3, atol=2e-3)
    assert chunked.get_output_embeddings().weight.grad.dtype == torch.float32  # fp32 master
    for (name, a), b in zip(chunked.named_parameters(), plain.parameters(), strict=True):
        assert (a.grad - b.grad).norm() <= 1e-2 * b.grad.norm(), name  # bf16 rounding: ~3e-3


def test_without_autograd_only_the_loss_is_computed(monkeypatch):
    hidden, weight, targets = _problem()
    want = _reference(hidden, weight, targets).detach()

    def no_gradients(*_args):
        raise AssertionError("the gradient path ran without autograd")

    monkeypatch.setattr(chunked_ce._LinearCrossEntropy, "apply", no_gradients)
    with torch.no_grad():
        got = chunked_cross_entropy(hidden, weight, targets, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got = chunked_cross_entropy(hidden.detach(), weight.detach(), targets, 8)
    assert got.grad_fn is None
    model, windows = _model(chunk=40), _windows()
    model.eval()
    with torch.no_grad():
        loss = causal_lm_loss(model, windows)
    model.loss_chunk_tokens = 0
    with torch.no_grad():
        torch.testing.assert_close(loss, causal_lm_loss(model, windows), rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_it_in_one_graph():
    hidden, weight, targets = _problem()

    def mean_loss(h, w, t):
        return chunked_cross_entropy(h, w, t, 16) / (t != IGNORE).sum()

    torch._dynamo.reset()
    compiled = torch.compile(mean_loss, backend="aot_eager", fullgraph=True)
    got = _loss_and_grads(compiled, hidden, weight, targets)
    want = _loss_and_grads(mean_loss, hidden, weight, targets)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, weight, targets), want[0])


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op creates (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tokens_by_vocab_tensor_exists_with_chunking():
    windows = _windows(batch=4, seq=129)  # 512 tokens x 2048 = 1M elements
    tokens_by_vocab = 4 * 128 * VOCAB
    largest = {}
    for chunk in (128, 0):
        model = _model(chunk)
        with _LargestTensor() as mode:
            causal_lm_loss(model, windows).backward()
        largest[chunk] = mode.largest
    assert largest[0] >= tokens_by_vocab  # the old path: whole logits (and their gradient)
    # Chunked: the head weight (vocab x 256) is now the largest, chunk x vocab a quarter.
    assert largest[128] <= VOCAB * 256 < tokens_by_vocab


def test_checkpoints_stay_plain_gpt_neox(tmp_path: Path):
    """Same class, same init, and the saved names (``embed_out``) that mlx-lm reads."""
    model = _model(chunk=40)
    assert type(model) is transformers.GPTNeoXForCausalLM
    for a, b in zip(model.state_dict().values(), _model(chunk=0).state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "GPTNeoXForCausalLM"]
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert "embed_out.weight" in saved.keys() and "lm_head.weight" not in saved.keys()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded) is transformers.GPTNeoXForCausalLM
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_attention_setting_picks_the_implementation():
    assert _model(0, "causal").config._attn_implementation == CAUSAL_ATTENTION
    assert _model(0, "sdpa").config._attn_implementation == "sdpa"


def test_ddp_gets_the_head_gradient_through_autograd(tmp_path: Path):
    """Without find_unused_parameters, a parameter whose gradient bypassed autograd would
    make DDP fail on the next step; its gradients must equal the unwrapped model's."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model, plain = _model(chunk=40), _model(chunk=0)
        plain.load_state_dict(model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for step in range(2):
            model.zero_grad(set_to_none=True)
            plain.zero_grad(set_to_none=True)
            windows = _windows(seq=33 + step)
            causal_lm_loss(ddp, windows).backward()
            causal_lm_loss(plain, windows).backward()
        for (name, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()
