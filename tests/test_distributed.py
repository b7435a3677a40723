"""Scale-out with real processes: two CPU ranks joined with gloo through accelerate launch.

Two ranks with half the per-device batch must train like one process with the whole batch,
log and upload once, sync data once per machine, and resume exactly, also as two "machines"
(two launchers, separate output folders) on this host. accelerate enables FSDP only on GPUs,
so on a CPU train.py must refuse it; the FSDP checkpoint path is proven under torch's own
FSDP2 on gloo, sharded the way configs/accelerate/fsdp.yaml says.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import Watched, clean_env, metrics
from lora_data import LORA, TRAIN_PAIRS, qa, write_jsonl

from utils import checkpoint

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRAIN = ["train.py", "--config", "smoke", "--seq-len", "64", "--max-steps", "6",
         "--logging-steps", "1", "--eval-steps", "1000", "--save-steps", "3"]
STEP3 = "checkpoint-epoch0-step3-files1"
STEP6 = "checkpoint-epoch0-step6-files1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_two(*extra: str) -> list[str]:
    """Two real CPU processes (not --cpu: that silently starts one)."""
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *extra]


@dataclass
class Result:
    returncode: int
    output: str  # stdout and stderr of all ranks and the launcher, interleaved


def launch(cmd: list[str], tmp: Path, env: dict[str, str] | None = None,
           name: str = "run") -> Watched:
    """Start from the repo root with one thread per process and temp files inside ``tmp``
    (a user's clean environment: an outer launcher's variables would join these runs to it)."""
    return Watched(cmd, tmp, name, clean_env(tmp, **(env or {})), merge_output=True)


def finish(started: Watched) -> Result:
    """Wait for the end (a hang fails, helpers.STALL_S; a loaded machine is only slower)."""
    started.wait()
    return Result(started.proc.returncode, started.stdout)


def run(cmd: list[str], tmp: Path, env: dict[str, str] | None = None) -> Result:
    return finish(launch(cmd, tmp, env))


def ok(result: Result) -> Result:
    assert result.returncode == 0, result.output[-4000:]
    return result


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out)}


# ------------------------------------------------------------------ shared runs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~290K tokens of real text with a tokenizer trained on the spot (vocab 2048)."""
    root = tmp_path_factory.mktemp("dist-data")
    ok(run([sys.executable, "-m", "data.prepare", "--out", str(root / "data"),
            "--tokenizer-out", str(root / "tok"), "--max-mb", "1"], root))
    return root / "data"


@pytest.fixture(scope="module")
def single_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, per-device batch 8."""
    tmp = tmp_path_factory.mktemp("single")
    ok(run([sys.executable, *TRAIN, "--bucket", "", "--data-dir", str(tiny_data),
            "--output-dir", str(tmp / "out"), "--per-device-train-batch-size", "8"], tmp))
    return tmp / "out"


@dataclass
class DdpRun:
    out: Path
    result: Result
    bucket: str  # gs:// URL on the emulator, object versioning on
    emulator_url: str


def create_versioned_bucket(emulator_url: str, name: str) -> str:
    """With versioning every upload of a name adds a generation: duplicates stay visible."""
    body = json.dumps({"name": name, "versioning": {"enabled": True}}).encode()
    req = urllib.request.Request(f"{emulator_url}/storage/v1/b?project=test", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10):
        pass
    return f"gs://{name}"


def object_versions(emulator_url: str, bucket: str, prefix: str) -> list[str]:
    """Every generation of every object under ``prefix``: a name twice = uploaded twice."""
    name = bucket.removeprefix("gs://")
    query = urllib.parse.urlencode({"versions": "true", "prefix": prefix})
    with urllib.request.urlopen(f"{emulator_url}/storage/v1/b/{name}/o?{query}",
                                timeout=10) as r:
        return [item["name"] for item in json.loads(r.read()).get("items", [])]


@pytest.fixture(scope="module")
def ddp_run(tiny_data: Path, gcs_emulator, tmp_path_factory: pytest.TempPathFactory) -> DdpRun:
    """Two processes x batch 4, data synced from and checkpoints uploaded to a GCS bucket."""
    tmp = tmp_path_factory.mktemp("ddp")
    bucket = create_versioned_bucket(gcs_emulator.url, "dist-ddp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
        mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        from utils.storage import open_store

        store = open_store(bucket).child("training")
        for path in sorted(tiny_data.iterdir()):
            if not path.name.startswith("."):
                store.upload_file(path, path.name)
    result = ok(run(accelerate_two(*TRAIN, "--bucket", bucket, "--sync-data",
                                   "--data-dir", str(tmp / "synced"),
                                   "--output-dir", str(tmp / "out"),
                                   "--per-device-train-batch-size", "4"),
                    tmp, env={"STORAGE_EMULATOR_HOST": gcs_emulator.url}))
    return DdpRun(tmp / "out", result, bucket, gcs_emulator.url)


@dataclass
class ResumedRun:
    outs: list[Path]  # per machine
    results: list[Result]
    bucket: Path


@pytest.fixture(scope="module")
def resumed_run(ddp_run: DdpRun, tiny_data: Path,
                tmp_path_factory: pytest.TempPathFactory) -> ResumedRun:
    """Two machines of one process each, with their own disks (output folders), resuming
    from a local-directory bucket that holds the step-3 checkpoint."""
    tmp = tmp_path_factory.mktemp("resumed")
    bucket = tmp / "bucket"
    shutil.copytree(ddp_run.out / "checkpoints" / STEP3, bucket / "checkpoints" / "smoke" / STEP3)
    port = str(free_port())
    outs = [tmp / f"machine{rank}" for rank in (0, 1)]
    started = [launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "2", "--machine_rank", str(rank),
                       "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                       "--mixed_precision", "no", "--dynamo_backend", "no",
                       *TRAIN, "--bucket", str(bucket), "--resume", "latest",
                       "--data-dir", str(tiny_data), "--output-dir", str(outs[rank]),
                       "--per-device-train-batch-size", "4"], tmp, name=f"machine{rank}")
               for rank in (0, 1)]
    results = [ok(finish(s)) for s in started]
    return ResumedRun(outs, results, bucket)


# ------------------------------------------------------------------ DDP


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(single_run: Path,
                                                                   ddp_run: DdpRun) -> None:
    assert "4 per device x 1 accumulation x 2 processes = 8 sequences (512 tokens)" in \
        ddp_run.result.output
    one, two = losses(single_run), losses(ddp_run.out)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    assert one[6] < one[1] - 0.3  # it learned: equal losses are not two idle runs


@pytest.mark.slow
def test_only_the_main_process_logs_and_one_process_per_node_syncs(ddp_run: DdpRun) -> None:
    assert [m["step"] for m in metrics(ddp_run.out)] == [1, 2, 3, 4, 5, 6]
    # TensorBoard names event files events.out.tfevents.TIME.HOST.PID.N: one writer process.
    events = list((ddp_run.out / "logs").rglob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, events
    synced = [line for line in ddp_run.result.output.splitlines()
              if line.startswith("downloaded ")]
    assert len(synced) == 1 and synced[0].startswith("downloaded 2 "), synced
    assert (ddp_run.out.parent / "synced" / "dataset.json").is_file()


@pytest.mark.slow
def test_each_checkpoint_file_is_uploaded_exactly_once(ddp_run: DdpRun) -> None:
    for name in (STEP3, STEP6):
        local = ddp_run.out / "checkpoints" / name
        manifest = checkpoint.read_manifest(local)
        assert {"rng_state_0.pt", "rng_state_1.pt", "model.safetensors"} <= set(manifest)
        prefix = f"checkpoints/smoke/{name}/"
        versions = object_versions(ddp_run.emulator_url, ddp_run.bucket, prefix)
        # A large file goes up as slices composed in the bucket: each slice once, too.
        parts = [v for v in versions if "/.parts/" in v]
        assert len(parts) == len(set(parts))
        finals = [v for v in versions if "/.parts/" not in v]
        assert sorted(finals) == sorted(prefix + f for f in [*manifest, checkpoint.MARKER])


@pytest.mark.slow
def test_two_machines_resume_exactly_from_the_bucket(ddp_run: DdpRun,
                                                     resumed_run: ResumedRun) -> None:
    """Same world size, new machines: each downloads the checkpoint, losses continue exactly."""
    for out, result in zip(resumed_run.outs, resumed_run.results, strict=True):
        assert f"resumed from {out / 'checkpoints' / STEP3} at step 3" in result.output
        assert "x 2 processes" in result.output
    main, other = resumed_run.outs
    uninterrupted, resumed = losses(ddp_run.out), losses(main)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [uninterrupted[s] for s in (4, 5, 6)]
    # Only the global main process logs; the other machine writes no metrics or TensorBoard.
    assert not (other / "metrics.jsonl").exists() and not (other / "logs").exists()
    assert not (other / "checkpoints" / STEP6).exists()
    # The bucket holds one copy of each file of the new checkpoint (both ranks' RNG included).
    local = main / "checkpoints" / STEP6
    remote = resumed_run.bucket / "checkpoints" / "smoke" / STEP6
    names = sorted(p.name for p in remote.iterdir() if not p.name.startswith("."))
    assert names == sorted([*checkpoint.read_manifest(local), checkpoint.MARKER])
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= set(names)
    for name in names:
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    run_dir = resumed_run.bucket / "checkpoints" / "smoke"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) \
        == sorted([STEP3, STEP6, checkpoint.lineage.HEAD])  # the lease was released


@pytest.mark.slow
def test_two_streaming_ranks_number_the_windows_from_one_listing(tiny_data: Path, gcs_bucket,
                                                                 gcs_emulator, tmp_path: Path):
    """--stream on two ranks: the main process lists the data once and every rank takes its
    table (ranks listing apart could each see a bucket that changed meanwhile)."""
    from gcs_emulator import FaultProxy

    from utils.storage import open_store, sync_up

    sync_up(tiny_data, open_store(gcs_bucket).child("training"), progress=False)
    proxy = FaultProxy(gcs_emulator.url, [])
    proxy.start()
    try:
        ok(run(accelerate_two(*TRAIN, "--bucket", gcs_bucket, "--stream",
                              "--data-dir", str(tmp_path / "cache"),
                              "--output-dir", str(tmp_path / "out"),
                              "--per-device-train-batch-size", "4"),
               tmp_path, env={"STORAGE_EMULATOR_HOST": proxy.url}))
    finally:
        proxy.stop()
    listings = [r for r in proxy.requests
                if r.startswith("GET ") and "/o?" in r and "prefix=training" in r]
    assert len(listings) == 1, listings
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_within_two_steps(tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    """The stop flag is exchanged without a per-step sync and read a step late: a SIGTERM to
    rank 1 alone still stops both ranks after the same step, saved, exit 0."""


    out = tmp_path / "out"
    started = launch(accelerate_two(*TRAIN, "--bucket", "", "--data-dir", str(tiny_data),
                                    "--output-dir", str(out), "--max-steps", "400",
                                    "--save-steps", "1000", "--per-device-train-batch-size",
                                    "4"), tmp_path)
    started.wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3,
                     "step 3", poll_s=0.05)
    rank1 = next(p for p in started.family() if p.environ().get("RANK") == "1")
    seen = metrics(out)[-1]["step"]  # rank 1 is at most a step ahead of rank 0's log
    rank1.send_signal(signal.SIGTERM)
    result = ok(finish(started))
    stopped = metrics(out)[-1]["step"]
    assert seen < stopped <= seen + 3, (seen, stopped)
    assert result.output.count("SIGTERM received") == 1  # rank 0 was never signalled
    assert f"stopping at step {stopped} on request" in result.output
    name = f"checkpoint-epoch0-step{stopped}-files1"
    assert checkpoint.read_manifest(out / "checkpoints" / name)


# ------------------------------------------------------------------ FSDP


def test_fsdp_launch_on_cpu_refuses_instead_of_training_unsharded(tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    """accelerate maps a CPU launch to MULTI_CPU and would silently run DDP."""
    result = run([str(BIN / "accelerate"), "launch", "--config_file",
                  "configs/accelerate/fsdp.yaml", "--num_processes", "2",
                  "--main_process_port", str(free_port()), *TRAIN, "--bucket", "",
                  "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "out")],
                 tmp_path)
    assert result.returncode != 0
    assert "error: FSDP was requested (--fsdp / fsdp.yaml) but accelerate set up MULTI_CPU" \
        in result.output, result.output[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


FSDP_WORKER = '''
"""Shard as fsdp.yaml says (torch FSDP2 on gloo), train, checkpoint, resume, reload with HF."""
import json, sys
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from configs.training_config import preset
from utils import checkpoint
from utils.checkpoint import TrainState
from utils.torch_engine import checkpoint_io
from utils.torch_engine.model import build_model
from utils.torch_engine.losses import causal_lm_loss
from utils.torch_engine.optim import build_adamw

out = Path(sys.argv[1])
acc = Accelerator(cpu=True)
plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables fsdp.yaml set
result = {"plugin": [plugin.fsdp_version, plugin.reshard_after_forward,
                     plugin.transformer_cls_names_to_wrap, plugin.state_dict_type.name]}


def sharded(seed):
    torch.manual_seed(seed)
    model = build_model(preset("smoke"), {"vocab_size": 512})
    for module in model.modules():
        if type(module).__name__ in plugin.transformer_cls_names_to_wrap:
            fully_shard(module, reshard_after_forward=plugin.reshard_after_forward)
    fully_shard(model, reshard_after_forward=plugin.reshard_after_forward)
    opt = build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def batch(step, rank):
    return torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(
        1000 * step + rank))


def train(model, opt, sched, steps):
    losses = []
    for s in steps:
        loss = causal_lm_loss(model, batch(s, acc.process_index))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(acc.reduce(loss.detach(), "mean").item())
    return losses


model, opt, sched = sharded(0)
w = model.gpt_neox.layers[0].attention.query_key_value.weight
result["local_rows"], result["rows"] = w.to_local().shape[0], w.shape[0]
result["dtensor"] = isinstance(w, DTensor)
result["before"] = train(model, opt, sched, range(3))
path = checkpoint_io.save_checkpoint(acc, model, opt, sched, TrainState(step=3), {}, out)
if acc.is_main_process:
    checkpoint.write_manifest(path)
# The same weights the way accelerate's save_state writes SHARDED_STATE_DICT: one file per rank.
dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out / "sharded"))
acc.wait_for_everyone()
result["after"] = train(model, opt, sched, range(3, 6))

model, opt, sched = sharded(1)  # other initial weights: only the checkpoint can make them equal
result["step"] = checkpoint_io.load_checkpoint(acc, model, opt, sched, path).step
probe = batch(99, 0)
with torch.no_grad():
    result["sharded_loss"] = causal_lm_loss(model, probe).item()
result["resumed"] = train(model, opt, sched, range(3, 6))
if acc.is_main_process:
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(path)
        result["hf_loss"] = causal_lm_loss(hf, probe).item()
    optim = torch.load(path / "optimizer.pt", weights_only=True)
    state = optim["state"]["gpt_neox.layers.0.attention.query_key_value.weight"]
    result["optim_rows"] = state["exp_avg"].shape[0]
    print("RESULT " + json.dumps(result), flush=True)
acc.wait_for_everyone()
'''


@pytest.mark.slow
def test_fsdp_two_processes_shard_train_checkpoint_and_resume(tmp_path: Path) -> None:
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    result = ok(run([str(BIN / "accelerate"), "launch", "--config_file",
                     "configs/accelerate/fsdp.yaml", "--num_processes", "2",
                     "--main_process_port", str(free_port()), str(worker),
                     str(tmp_path / "ckpts")], tmp_path, env={"PYTHONPATH": str(REPO)}))
    line = next(x for x in result.output.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    assert got["plugin"] == [2, True, ["GPTNeoXLayer"], "FULL_STATE_DICT"]
    assert got["dtensor"] and got["local_rows"] * 2 == got["rows"]  # really split in two
    assert got["before"][-1] < got["before"][0]
    assert got["step"] == 3
    assert got["resumed"] == got["after"]  # weights, optimizer state and schedule all restored
    assert got["hf_loss"] == pytest.approx(got["sharded_loss"], abs=1e-6)  # from_pretrained as is
    assert got["optim_rows"] == got["rows"]  # optimizer state saved whole, not rank 0's shard
    saved = tmp_path / "ckpts" / "checkpoint-epoch0-step3-files0"
    assert checkpoint.verify(saved, hashes=True) is None
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in saved.iterdir()}

    # docs/DISTRIBUTED.md's consolidation command turns the sharded copy into the same model.
    sharded, merged = tmp_path / "ckpts" / "sharded", tmp_path / "merged"
    assert len(list(sharded.glob("*.distcp"))) == 2
    ok(run([str(BIN / "accelerate"), "merge-weights", str(sharded), str(merged)], tmp_path))
    shutil.copy(saved / "config.json", merged / "config.json")
    from transformers import AutoModelForCausalLM

    want = AutoModelForCausalLM.from_pretrained(saved).state_dict()
    got_sd = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert want.keys() == got_sd.keys()
    assert all(torch.equal(want[k], got_sd[k]) for k in want)



@pytest.mark.slow
def test_sft_on_two_processes_or_with_accumulation_trains_like_one_batch(tiny_base, tmp_path):
    """The SFT loss is the mean over the optimizer step's answer tokens on every rank and
    micro-batch, so 2 processes x batch 2 and 1 process x batch 2 x 2 accumulation both repeat
    1 process x batch 4 (a mean of per-batch means would not: answer lengths differ)."""
    data = write_jsonl(tmp_path / "sft.jsonl", qa(TRAIN_PAIRS[:24]))
    common = [*LORA, "--stage", "sft", "--init-from", str(tiny_base), "--data-dir", str(data),
              "--max-steps", "4", "--save-steps", "4", "--logging-steps", "1",
              "--lora-dropout", "0", "--no-group-by-length", "--learning-rate", "3e-3"]
    outs = {name: tmp_path / name for name in ("one", "two", "accum")}
    ok(run([sys.executable, "train.py", *common, "--output-dir", str(outs["one"]),
            "--per-device-train-batch-size", "4"], tmp_path))
    ok(run(accelerate_two("train.py", *common, "--output-dir", str(outs["two"]),
                          "--per-device-train-batch-size", "2"), tmp_path))
    ok(run([sys.executable, "train.py", *common, "--output-dir", str(outs["accum"]),
            "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2"],
           tmp_path))
    want = losses(outs["one"])
    assert sorted(want) == [1, 2, 3, 4]
    for name in ("two", "accum"):
        got = losses(outs[name])
        assert sorted(got) == sorted(want), name
        assert all(abs(got[s] - want[s]) < 1e-4 for s in want), (name, got, want)
        assert [m["tokens_seen"] for m in metrics(outs[name])] == [
            m["tokens_seen"] for m in metrics(outs["one"])]



STALL = """import time

from utils.loop.callbacks import Callback


class Stall(Callback):
    def post_step(self, trainer):  # until the launcher, its peer gone, sends SIGTERM
        if trainer.engine.process_index == 1 and trainer.state.step == 3:
            while not trainer.preemption.requested:
                time.sleep(0.1)
"""


@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_after_the_collective_timeout(tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    """Rank 1 stops answering after step 3 (a callback sleeps in it, as a hung read would):
    rank 0 waits --collective-timeout-minutes (6 s here), then says so in one line and the
    job ends, instead of waiting torch's own timeout or forever."""
    (tmp_path / "stall.py").write_text(STALL)
    started = launch(accelerate_two(*TRAIN, "--bucket", "", "--data-dir", str(tiny_data),
                                    "--output-dir", str(tmp_path / "out"), "--max-steps", "400",
                                    "--save-steps", "1000", "--per-device-train-batch-size", "4",
                                    "--callbacks", f"{tmp_path / 'stall.py'}:Stall",
                                    "--collective-timeout-minutes", "0.1"), tmp_path)
    assert started.wait() != 0
    # Rank 0 times out (gloo: "Application timeout caused pair closure"); rank 1, let go by
    # the launcher's SIGTERM, then finds rank 0 gone: each says so in one line.
    errors = [x for x in started.stdout.splitlines() if x.startswith("error: ")]
    assert errors and all(x.startswith("error: lost another process of this job (")
                          and "--collective-timeout-minutes" in x for x in errors), errors
    assert any("timeout" in x.lower() for x in errors), errors
    assert 'train.py", line' not in started.stdout
    assert max(losses(tmp_path / "out")) <= 4  # it stopped where rank 1 did

@pytest.mark.parametrize(("message", "said"), [
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
     "by peer [10.77.0.2]:53985. This is typically caused by a remote worker crashing.",
     "Connection closed by peer [10.77.0.2]:53985"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [10.77.0.2]:29500: "
     "Connection reset by peer", "Read error [10.77.0.2]:29500: Connection reset by peer"),
])
def test_a_lost_peer_is_one_line_naming_it(message: str, said: str) -> None:
    """What gloo raises in a survivor (seen in tests/test_two_machines.py) becomes one line
    with the peer's address and what to do; any other error stays a traceback (None)."""
    from utils.torch_engine.peers import lost_peer

    line = lost_peer(RuntimeError(message))
    assert line is not None and line.startswith(f"lost another process of this job ({said}): ")
    assert "--resume latest" in line and "\n" not in line
    assert lost_peer(torch.distributed.DistBackendError("NCCL error: unhandled system error"))
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_peer(ValueError("by peer")) is None
