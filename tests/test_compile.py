"""torch.compile fits the model: one fullgraph compile of a transformer layer serves all of
them (regional), the whole model traces without a graph break, and training through either
gives the eager model's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from configs.training_config import preset
from utils.torch_engine.compiling import compile_model, repeated_layers
from utils.torch_engine.model import build_model

META = {"vocab_size": 256}


class Recorder:
    """A dynamo backend that keeps every graph it is given and runs it as traced."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, _inputs: list) -> object:
        self.graphs.append(gm)
        return gm.forward


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(preset("smoke"), META)


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict]:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scope", ["layers", "model"])
def test_compiled_training_matches_eager_with_no_graph_break(scope: str) -> None:
    torch._dynamo.reset()
    ids = torch.randint(0, 256, (2, 32))
    eager_loss, eager_grads = _loss_and_grads(_model(), ids)
    recorder = Recorder()
    compiled, what = compile_model(_model(), scope, backend=recorder)
    loss, grads = _loss_and_grads(compiled, ids)
    if scope == "layers":
        layers = repeated_layers(compiled)
        assert what == f"{len(layers)} x GPTNeoXLayer (regional, fullgraph)"
        # fullgraph=True turns any break into an error; one graph serves all 4 layers.
        assert len(layers) == 4 and len(recorder.graphs) == 1
    else:
        assert len(recorder.graphs) == 1  # the whole forward, unbroken
    assert loss == pytest.approx(eager_loss, abs=1e-5)
    for name, grad in eager_grads.items():
        key = name if name in grads else f"_orig_mod.{name}"
        torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4)


def test_regional_compile_does_not_change_checkpoint_keys() -> None:
    torch._dynamo.reset()
    model = _model()
    keys = list(model.state_dict())
    compiled, _ = compile_model(model, "layers", backend=Recorder())
    assert compiled is model and list(compiled.state_dict()) == keys
