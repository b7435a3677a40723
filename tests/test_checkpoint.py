"""Checkpoints in-process: layout, marker-last, exact reload, refusal of bad files, publishing.

Real pieces throughout: accelerate on the CPU, a small GPT-NeoX, real files, and the
session's fake-gcs-server (behind FaultProxy where a test needs faults or a view mid-upload).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from gcs_emulator import FaultProxy
from helpers import REPO, finish, remote_problems
from transformers import GPTNeoXForCausalLM

from configs.model_config import ModelSize, to_hf_config
from utils.checkpoint import (
    MARKER,
    CheckpointError,
    TrainState,
    choose_resume,
    find_complete,
    prune,
    remote_complete,
    verify,
    write_manifest,
)
from utils.checkpoint.publisher import CheckpointPublisher
from utils.data import DataPosition
from utils.loop.schedule import lr_factor
from utils.storage import open_store
from utils.torch_engine.checkpoint_io import load_checkpoint, save_checkpoint
from utils.torch_engine.losses import causal_lm_loss
from utils.torch_engine.optim import build_adamw

SIZE = ModelSize(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=64)
VOCAB = 256
PREFIX = "checkpoints/run"


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def _setup(accelerator: Accelerator, seed: int):
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(to_hf_config(SIZE, vocab_size=VOCAB))
    optimizer = build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=2, max_steps=10, min_ratio=0.1))
    return accelerator.prepare(model, optimizer, scheduler)


def _step(accelerator: Accelerator, model, optimizer, scheduler, batch: torch.Tensor) -> None:
    accelerator.backward(causal_lm_loss(model, batch))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _state(step: int) -> TrainState:
    return TrainState(step=step, tokens_seen=step * 64, num_files=1, train_windows=100,
                      position=DataPosition(0, 2 * step), global_batch_windows=2)


@pytest.fixture
def saved(accelerator: Accelerator, tmp_path: Path):
    """A model trained two steps and its checkpoint (not yet marked complete)."""
    model, optimizer, scheduler = _setup(accelerator, seed=0)
    for _ in range(2):
        _step(accelerator, model, optimizer, scheduler, torch.randint(0, VOCAB, (2, 17)))
    root = tmp_path / "checkpoints"
    path = save_checkpoint(accelerator, model, optimizer, scheduler, _state(2),
                           {"model": "test"}, root)
    return model, optimizer, scheduler, path


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _copies(src: Path, steps: list[int]) -> list[Path]:
    """Copies of a checkpoint under other step names (publishing does not look inside)."""
    out = []
    for step in steps:
        dest = src.parent / f"checkpoint-epoch0-step{step}-files1"
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns(MARKER))
        out.append(dest)
    return out


# ---------------------------------------------------------------- save / load

def test_layout_marker_last_and_exact_reload(accelerator, tmp_path):
    model, optimizer, scheduler = _setup(accelerator, seed=0)
    for _ in range(2):
        _step(accelerator, model, optimizer, scheduler, torch.randint(0, VOCAB, (2, 17)))
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".tmp-checkpoint-epoch0-step1-files1").mkdir()  # a write cut short by a crash
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint(accelerator, model, optimizer, scheduler, _state(2), {"lr": 1e-3}, root)
    after_save = (random.random(), float(np.random.rand()), torch.rand(3))

    assert path == root / "checkpoint-epoch0-step2-files1"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt",
            "rng_state_0.pt", "trainer_state.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pkl"))]
    assert [p.name for p in root.iterdir()] == [path.name]  # stale temporary cleaned up
    saved_state = json.loads((path / "trainer_state.json").read_text())
    assert saved_state["epoch"] == 0 and saved_state["state"]["tokens_seen"] == 128
    # Written, but it does not count until the marker exists.
    assert verify(path) == "no completion marker" and find_complete(root) == []
    write_manifest(path)
    assert find_complete(root) == [path] and verify(path, hashes=True) is None
    manifest = json.loads((path / MARKER).read_text())["files"]
    assert set(manifest) == names and all(len(f["crc32c"]) == 8 for f in manifest.values())

    # Hugging Face loads the folder as is, and computes the training model's logits exactly.
    batch = torch.randint(0, VOCAB, (2, 16))
    loaded = GPTNeoXForCausalLM.from_pretrained(path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, model(input_ids=batch).logits)
    model.train()

    # A fresh, differently initialised model resumes to the identical state, RNGs included.
    fresh_model, fresh_opt, fresh_sched = _setup(accelerator, seed=99)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    state = load_checkpoint(accelerator, fresh_model, fresh_opt, fresh_sched, path)
    assert state == _state(2)
    assert (random.random(), float(np.random.rand())) == after_save[:2]
    assert torch.equal(torch.rand(3), after_save[2])
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    same_batch = torch.randint(0, VOCAB, (2, 17))
    _step(accelerator, model, optimizer, scheduler, same_batch)
    _step(accelerator, fresh_model, fresh_opt, fresh_sched, same_batch)
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)  # optimizer moments restored bit for bit


def test_truncated_corrupted_or_malformed_checkpoints_fail_verify(saved, accelerator):
    model, optimizer, scheduler, path = saved
    write_manifest(path)
    root = path.parent

    truncated = root / "checkpoint-epoch0-step3-files1"
    shutil.copytree(path, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "model.safetensors has" in verify(truncated) and "truncated" in verify(truncated)

    corrupted = root / "checkpoint-epoch0-step4-files1"
    shutil.copytree(path, corrupted)
    _flip_byte(corrupted / "optimizer.pt")
    assert verify(corrupted) is None  # same size: only the checksum can tell
    assert "optimizer.pt fails its crc32c" in verify(corrupted, hashes=True)
    assert [p.name for p in find_complete(root)] == [path.name, corrupted.name]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(accelerator, model, optimizer, scheduler, corrupted)
    assert "\n" not in str(err.value) and "--resume latest" in str(err.value)

    missing = root / "checkpoint-epoch0-step5-files1"
    shutil.copytree(path, missing)
    (missing / "scheduler.pt").unlink()
    assert verify(missing) == "scheduler.pt is missing"

    marker = json.loads((path / MARKER).read_text())
    for files, reason in [({"../../etc/passwd": {"size": 1, "crc32c": "x"}}, "unsafe path"),
                          ({"config.json": marker["files"]["config.json"]}, "lacks"),
                          ("nonsense", "unreadable marker")]:
        (missing / MARKER).write_text(json.dumps({"files": files}))
        assert reason in verify(missing)


def test_pickled_code_is_never_executed(saved, accelerator, tmp_path):
    """A crafted optimizer.pt whose marker was rewritten to match is refused, not run."""
    model, optimizer, scheduler, path = saved
    witness = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(witness)],))

    torch.save({"state": Payload()}, path / "optimizer.pt")
    write_manifest(path)  # the attacker also fixed the checksums
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(accelerator, model, optimizer, scheduler, path)
    assert "refused to load" in str(err.value) and "optimizer.pt" in str(err.value)
    assert not witness.exists()
    # The payload is live: an unrestricted unpickler would have run it.
    torch.load(path / "optimizer.pt", weights_only=False)
    assert witness.exists()

    # Pickled weights are never an option either: the marker must name safetensors.
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    write_manifest(path)
    assert "lacks model.safetensors" in verify(path)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_lora_checkpoint_holds_adapters_only_and_reloads_exactly(accelerator, tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora(seed: int):
        torch.manual_seed(seed)
        base = GPTNeoXForCausalLM(to_hf_config(SIZE, vocab_size=VOCAB))
        torch.manual_seed(0)  # the same frozen base in both
        base.load_state_dict(GPTNeoXForCausalLM(to_hf_config(SIZE, vocab_size=VOCAB))
                             .state_dict())
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                target_modules=["query_key_value"]))
        optimizer = build_adamw(model, 1e-2, 0.0, (0.9, 0.95), 1e-8)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        return accelerator.prepare(model, optimizer, scheduler)

    model, optimizer, scheduler = lora(seed=1)
    for _ in range(2):
        _step(accelerator, model, optimizer, scheduler, torch.randint(0, VOCAB, (2, 17)))
    path = save_checkpoint(accelerator, model, optimizer, scheduler, _state(2), {},
                           tmp_path / "checkpoints")
    write_manifest(path)
    names = {p.name for p in path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert "model.safetensors" not in names and verify(path, hashes=True) is None

    fresh, fresh_opt, fresh_sched = lora(seed=2)
    assert load_checkpoint(accelerator, fresh, fresh_opt, fresh_sched, path) == _state(2)
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert trained and all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items())
    with pytest.raises(CheckpointError, match="holds LoRA adapters"):  # a full-model run
        load_checkpoint(accelerator, *_setup(accelerator, seed=0), path)


# ---------------------------------------------------------------- choosing what to resume

def test_choose_resume_prefers_good_copies_and_downloads(saved, gcs_bucket, tmp_path):
    _, _, _, path = saved
    root = path.parent
    newer = _copies(path, [4])[0]
    write_manifest(path)
    store = open_store(gcs_bucket, retry_deadline_s=20)
    publisher = CheckpointPublisher(store, PREFIX, background=False, log=lambda _: None)
    publisher.submit(path)
    publisher.submit(newer)
    assert remote_complete(store, PREFIX) == [path.name, newer.name]
    logs: list[str] = []

    _flip_byte(newer / "model.safetensors")  # local copy corrupted, the bucket's is good
    chosen = choose_resume("latest", root, store, PREFIX, log=logs.append)
    assert chosen == newer and verify(newer, hashes=True) is None
    assert [p.name for p in root.glob(".bad-*")] != []  # set aside, not deleted

    _flip_byte(newer / "model.safetensors")
    assert choose_resume("latest", root, log=logs.append) == path  # no bucket: previous one
    assert "skipping checkpoint " + newer.name in logs[-1] and "crc32c" in logs[-1]
    with pytest.raises(CheckpointError, match="is not usable"):
        choose_resume(newer.name, root)
    with pytest.raises(CheckpointError, match=f"available: {path.name}, {newer.name}"):
        choose_resume("checkpoint-epoch0-step9-files1", root)

    shutil.rmtree(root)  # the machine is gone: only the bucket has the run
    chosen = choose_resume("latest", root, store, PREFIX)
    assert chosen == newer and verify(chosen, hashes=True) is None
    assert choose_resume("latest", tmp_path / "empty") is None


# ---------------------------------------------------------------- publishing

def test_marker_is_uploaded_last_and_a_replaced_checkpoint_stops_counting_first(
        saved, accelerator, gcs_emulator, gcs_bucket, monkeypatch):
    model, optimizer, scheduler, path = saved
    direct = open_store(gcs_bucket, retry_deadline_s=20)
    views: list[set[str]] = []  # what the bucket held as each upload request arrived

    def look() -> None:
        views.append({o.name.split("/", 1)[1] for o in direct.child(PREFIX).list()})

    proxy = FaultProxy(gcs_emulator.url, [look] * 100, match="uploadType=")
    proxy.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        store = open_store(gcs_bucket, retry_deadline_s=20)
        publisher = CheckpointPublisher(store, PREFIX, log=lambda _: None)
        publisher.submit(path)
        assert publisher.close(timeout=60)
        files = set(json.loads((path / MARKER).read_text())["files"])
        assert len(views) == len(files) + 1
        assert all(MARKER not in view for view in views)
        assert views[-1] == files  # every file was there before the marker went up
        assert remote_problems(direct, PREFIX) == {path.name: ""}

        # A resumed run redoes the step with other weights: the old marker goes first.
        _step(accelerator, model, optimizer, scheduler, torch.randint(0, VOCAB, (2, 17)))
        path = save_checkpoint(accelerator, model, optimizer, scheduler, _state(2), {},
                               path.parent)
        views.clear()
        publisher = CheckpointPublisher(store, PREFIX, log=lambda _: None)
        publisher.submit(path)
        assert publisher.close(timeout=60)
        assert views and all(MARKER not in view for view in views)
        remote_marker = direct.child(PREFIX).read_bytes(f"{path.name}/{MARKER}")
        assert remote_marker == (path / MARKER).read_bytes()
        assert remote_problems(direct, PREFIX) == {path.name: ""}
    finally:
        proxy.stop()


def test_failures_retry_and_a_backlog_keeps_the_newest(saved, gcs_emulator, gcs_bucket,
                                                      monkeypatch):
    """Upload failures are retried; submitting never waits; behind a slow upload, a newer
    checkpoint pushes out the oldest waiting one, which stays local (and says so)."""
    _, _, _, path = saved
    direct = open_store(gcs_bucket, retry_deadline_s=20)
    ckpts = _copies(path, [4, 6, 8])
    shutil.rmtree(path)
    # 503: retried inside the client; 403 and a dropped connection: the publisher backs off.
    proxy = FaultProxy(gcs_emulator.url, ["503", "403", "reset"], match="uploadType=",
                       delay_s=0.05)
    proxy.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        store = open_store(gcs_bucket, retry_deadline_s=5)
        logs: list[str] = []
        publisher = CheckpointPublisher(store, PREFIX, keep_local=2, remote_keep=2,
                                        max_waiting=1, max_backoff_s=1, log=logs.append)
        publisher.submit(ckpts[0])
        deadline = time.monotonic() + 30
        while not proxy.served and time.monotonic() < deadline:  # its upload has begun
            time.sleep(0.01)
        began = time.monotonic()
        publisher.submit(ckpts[1])
        publisher.submit(ckpts[2])
        assert time.monotonic() - began < 0.5  # the trainer never waits
        assert not publisher.close(timeout=120), logs  # one checkpoint stays local
    finally:
        proxy.stop()
    assert any("failed" in line and "attempt 2 of 6" in line for line in logs), logs
    assert [r.name for r in publisher.history if r.uploaded] == [ckpts[0].name, ckpts[2].name]
    reason = f"uploads fell behind and {ckpts[2].name} is newer"
    assert publisher.local_only == [(ckpts[1].name, reason)]
    assert f"checkpoint {ckpts[1].name} not uploaded: {reason}; it stays local" in logs
    assert all(r.marked for r in publisher.history)  # every one counts locally
    kept = [c.name for c in ckpts[1:]]
    assert [p.name for p in find_complete(path.parent)] == kept
    assert remote_problems(direct, PREFIX) == {ckpts[0].name: "", ckpts[2].name: ""}
    assert prune(path.parent, 1, protected={kept[0]}) == []  # never one still uploading


def test_wait_marked_returns_once_the_submitted_checkpoint_counts(saved, monkeypatch):
    """The checkpoint writer waits on this before the next write (which could fill the disk
    the previous one's marker still needs): a slow marking (1 s) is waited for."""
    from utils import checkpoint as checkpoint_package

    _, _, _, path = saved
    original = checkpoint_package.write_manifest

    def slow_manifest(ckpt: Path) -> None:
        time.sleep(1.0)
        original(ckpt)

    monkeypatch.setattr(checkpoint_package, "write_manifest", slow_manifest)
    publisher = CheckpointPublisher(None, PREFIX, log=lambda _: None)
    publisher.submit(path)
    assert find_complete(path.parent) == []  # still marking
    publisher.wait_marked()
    assert find_complete(path.parent) == [path]
    assert publisher.close(timeout=5)
    publisher.wait_marked()  # after close: returns at once


def test_catch_up_uploads_what_a_killed_run_left_local_only(saved, gcs_bucket):
    _, _, _, path = saved
    store = open_store(gcs_bucket, retry_deadline_s=20)
    write_manifest(path)
    publisher = CheckpointPublisher(store, PREFIX, log=lambda _: None)
    assert publisher.catch_up(path.parent) == path.name
    assert publisher.close(timeout=60)
    assert remote_problems(store, PREFIX) == {path.name: ""}
    again = CheckpointPublisher(store, PREFIX, log=lambda _: None)
    assert again.catch_up(path.parent) is None  # the bucket is up to date
    assert again.close(timeout=5)


def test_exit_waits_for_pending_uploads(saved, tmp_path):
    """An exception out of the training loop still lets queued uploads finish (bounded)."""
    _, _, _, path = saved
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from utils.storage import LocalStore
        from utils.checkpoint.publisher import CheckpointPublisher

        class SlowStore(LocalStore):  # a remote bucket: each file takes a while
            def child(self, prefix):
                return SlowStore(self.base, f"{{self.prefix}}/{{prefix}}".strip("/"))
            def upload_file(self, local, name, **kw):
                time.sleep(0.3)
                return super().upload_file(local, name, **kw)

        publisher = CheckpointPublisher(SlowStore(Path({str(bucket)!r})), "ck")
        publisher.submit(Path({str(path)!r}))
        raise RuntimeError("the training loop crashed")
    """)
    result = finish([sys.executable, "-c", script], cwd=tmp_path)
    assert result.returncode == 1 and "the training loop crashed" in result.stderr
    assert "exiting: waiting up to 60 s for checkpoint uploads" in result.stdout
    assert "uploaded checkpoint-epoch0-step2-files1" in result.stdout
    assert verify(bucket / "ck" / path.name, hashes=True) is None


def test_catch_up_also_uploads_permanent_checkpoints_the_bucket_lacks(saved, gcs_bucket,
                                                                     tmp_path):
    _, _, _, path = saved
    write_manifest(path)
    root = tmp_path / "ckpts"
    names = [f"checkpoint-epoch0-step{step}-files1" for step in (4, 6, 8, 10)]
    for name in names:
        shutil.copytree(path, root / name)
    store = open_store(gcs_bucket, retry_deadline_s=20)
    logs: list[str] = []
    publisher = CheckpointPublisher(store, PREFIX, keep_every=4, log=logs.append)
    assert publisher.catch_up(root) == names[-1]
    assert publisher.close(timeout=60), logs
    # Step 6 is neither permanent nor the newest: it stays local, as before.
    assert remote_problems(store, PREFIX) == {names[0]: "", names[2]: "", names[3]: ""}
