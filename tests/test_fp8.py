"""--fp8: why float8 training cannot run here (one line), and which layers torchao converts."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import finish

from utils.torch_engine import fp8
from utils.torch_engine.fp8 import fp8_unavailable

REPO = Path(__file__).resolve().parent.parent
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def _one_line(reason: str | None) -> str:
    assert reason and "\n" not in reason, reason
    return reason


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int],
              torchao: str = "0.18.0") -> None:
    monkeypatch.setattr(fp8, "_torchao_version", lambda: torchao)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_without_torchao_the_reason_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(fp8, "_torchao_version", lambda: None)
    for device in ("cpu", "cuda"):
        reason = _one_line(fp8_unavailable(torch.device(device)))
        assert "torchao" in reason and "pip install torchao" in reason


def test_with_torchao_on_the_cpu_the_reason_names_cuda_and_sm89(monkeypatch):
    monkeypatch.setattr(fp8, "_torchao_version", lambda: "0.18.0")
    reason = _one_line(fp8_unavailable(torch.device("cpu")))
    assert "CUDA" in reason and "8.9" in reason and "sm89" in reason and "cpu" in reason


def test_an_older_gpu_is_named_with_its_capability(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    reason = _one_line(fp8_unavailable(torch.device("cuda")))
    assert "NVIDIA A100-SXM4-80GB has 8.0" in reason and "8.9" in reason


def test_torch_older_than_torchao_needs_is_refused(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    reason = _one_line(fp8_unavailable(torch.device("cuda")))
    assert "torchao 0.18.0 needs torch 2.11" in reason and "2.10.0+cu128" in reason


def test_this_machine_gets_a_clear_single_line():
    """Whatever is installed here, a CPU run is refused and the line says what to do."""
    reason = _one_line(fp8_unavailable(torch.device("cpu")))
    assert ("pip install torchao" in reason) if not HAS_TORCHAO else ("CUDA" in reason)


# The conversion runs in its own process: torchao registers operators and patches inductor's
# code generation when converting, which the rest of the suite should not inherit.
CONVERT = """
import json, torch
from configs.training_config import preset
from utils.torch_engine.fp8 import to_float8
from utils.torch_engine.model import build_model

model = build_model(preset("smoke"), None)
n = to_float8(model)
kinds = {name: type(m).__name__ for name, m in model.named_modules()
         if isinstance(m, torch.nn.Linear)}
odd = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 10))
print(json.dumps({"converted": n, "kinds": kinds, "layers": model.config.num_hidden_layers,
                  "odd": to_float8(odd), "odd_kinds": [type(m).__name__ for m in odd]}))
"""


@pytest.mark.skipif(not HAS_TORCHAO, reason=(
    "torchao is not installed; it is kept out of requirements-dev.txt because, once installed, "
    "transformers imports it in every process that builds a model (CUDA-library warnings on a "
    "CPU machine); pip install torchao==0.18.0 to run this"))
def test_to_float8_converts_the_layer_linears_and_not_the_head(tmp_path):
    result = finish([sys.executable, "-c", CONVERT], cwd=REPO,
                    env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    per_layer = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h")
    assert found["converted"] == 4 * found["layers"]
    for name, kind in found["kinds"].items():
        expected = "Float8Linear" if name.endswith(per_layer) else "Linear"
        assert kind == expected, (name, kind)
    assert found["kinds"]["lm_head"] == "Linear"
    # 48 -> 10 is not a multiple of 16 on both sides: it stays a plain Linear.
    assert found["odd"] == 1 and found["odd_kinds"] == ["Float8Linear", "Linear"]


def test_train_py_refuses_fp8_here_in_one_line(tmp_path: Path) -> None:
    result = finish([sys.executable, "train.py", "--config", "smoke", "--fp8",
                     "--max-steps", "1", "--bucket", "", "--output-dir",
                     str(tmp_path / "out")], cwd=REPO)
    assert result.returncode == 2  # a configuration error (never restarted)
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: --fp8 cannot run here: ") and line.endswith("drop --fp8")
