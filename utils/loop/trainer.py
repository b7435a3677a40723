"""The training loop, written once: accumulation, logging, eval, saving, preemption, summary.

``Trainer(config, engine).run()`` pretrains or fine-tunes with whichever engine it is given;
the engine owns tensors and processes, the loop owns the step: when to log, evaluate, save,
stop, and what the run reports. Checkpoints are uploaded by a background publisher and
counted only once their marker is written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from configs.training_config import TrainingConfig
from utils.checkpoint import TrainState, find_complete, lineage, step_of
from utils.checkpoint.publisher import CheckpointPublisher
from utils.errors import TrainingError
from utils.loop.callbacks import (
    Callback,
    CallbackList,
    Evaluation,
    LogMirror,
    MetricsFile,
    ProgressBar,
    SpikeWatch,
    Trackers,
    load_callbacks,
)
from utils.loop.data_sync import sync_training_data
from utils.loop.engine import Engine, ModelInfo
from utils.loop.gce import preemption_facts
from utils.loop.goodput import Goodput
from utils.loop.metrics import ThroughputMeter, flops_per_token, run_summary
from utils.loop.optional_callbacks import configured_callbacks
from utils.loop.resuming import continue_from, open_checkpoint_store, resolve_resume
from utils.loop.rollback import Rollback, roll_back
from utils.loop.run_claim import claim_run, prepare_output_dir
from utils.loop.saving import Saver, preemption_report
from utils.loop.signals import PreemptionHandler
from utils.loop.tracker import check_trackers
from utils.loop.uploads import finish_uploads, uploads_survive_an_abort
from utils.processes import printer
from utils.stages.task import build_task
from utils.stages.tokenizers import tokenizer_dir
from utils.streaming import StopWatch, WaitStopped

EXIT_S = 1.0  # of a preemption budget, kept for the process to exit (see run._exit_now)
# The run lease's release (two small requests): bounded, since an unreleased lease only
# expires (at once for a restart on this machine, after its TTL elsewhere).
RELEASE_S, RELEASE_AFTER_SIGNAL_S = 5.0, 1.0


def due(step: int, every: int, max_steps: int) -> bool:
    """Logging/saving cadence: every ``every`` steps and at the last step."""
    return step % every == 0 or step == max_steps


def check_loss(mean_loss: float, step: int, ckpt_root: Path) -> None:
    """A NaN/inf loss of updates that were applied stops the run before anything is saved
    from it (the engines skip updates whose gradient norm is not finite: see ``check_skips``)."""
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"loss became {mean_loss} at step {step}: stopping without saving (lower "
            f"--learning-rate, or check the data); the last complete checkpoint is still in "
            f"{ckpt_root}")


def skips_problem(run: int, step: int, limit: int, ckpt_root: Path,
                  rollbacks: list[Rollback]) -> TrainingError:
    """The stop once rolling back is no longer allowed (``--max-rollbacks``): which steps,
    which rollbacks came before."""
    before = "; ".join(f"step {r.from_step} -> {r.to_step}, {r.windows_skipped} windows skipped"
                       for r in rollbacks)
    return TrainingError(
        f"{run} updates in a row up to step {step} had a non-finite loss or gradient norm "
        f"and were skipped (--max-skipped-steps {limit}), after {len(rollbacks)} rollback(s)"
        f"{f' ({before})' if before else ''}: stopping without saving (lower --learning-rate, "
        f"or check the data around these steps; --max-rollbacks allows more); the last "
        f"complete checkpoint is still in {ckpt_root}")


class Trainer:
    """One run of one stage: built from a config and an engine, then ``run()``."""

    def __init__(self, config: TrainingConfig, engine: Engine) -> None:
        self.created = time.time()  # the goodput account's start of a session
        self.config, self.engine = config, engine
        self.main = engine.is_main_process
        # Each machine's console shows the run (its local main process prints).
        self.say = printer(engine.is_local_main_process)
        self.output_dir = Path(config.effective_output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        check_trackers(config, engine)  # no wandb package or login: one line now, not later
        own_callbacks = load_callbacks(config.callbacks)  # a bad --callbacks: before the work

        prepare_output_dir(self.output_dir, engine)

        # Data and model for this stage (pretraining windows, or SFT/DPO examples on a LoRA
        # model), after syncing the data from the bucket (skip-existing).
        sync_training_data(config, engine)
        self.task = build_task(config, engine)
        self.info = engine.setup(self.task, config)
        self.store = open_checkpoint_store(config, engine)
        self.claim = claim_run(config, engine, self.ckpt_root, self.store, self.say)
        # What only the loop sees, for the goodput account (seconds): restore, data waits,
        # checkpoints (saves blocking the loop, the end's wait for uploads).
        self.timings: dict[str, float] = dict.fromkeys(("restore", "data_wait", "checkpoints"),
                                                       0.0)
        restore_started = time.perf_counter()
        self.state = self._resume()
        self.timings["restore"] = time.perf_counter() - restore_started
        self.sampler = self.task.sampler(config.per_device_train_batch_size,
                                         engine.process_index, engine.num_processes,
                                         config.seed, self.state.position)
        if self.task.feed is not None:  # --stream: fetch from where this run starts
            self.task.feed.start(self.state.position, engine, self.sampler.global_batch,
                                 self.say)
        self.batches = engine.batches(self.task, self.sampler)
        self.meter = self._meter(self.info)
        self._banner()

        # Before the threads that watch it: the mirror's waits, the readers' (--stream).
        self.preemption = PreemptionHandler()
        self.stop_watch = None if self.task.feed is None else StopWatch(
            lambda: self.preemption.requested, [s.root for s in self.task.feed.sources])

        self.latest: dict = {}  # the last logged value of each metric (the summary's)
        self.stopped_early = False
        self.callbacks = self._callbacks(own_callbacks)
        self._closed = False
        self.publisher, self.saver = self._checkpointing()
        self.last_save = time.monotonic()
        self.interval_steps = 0
        self.pending_votes: Callable[[], list[float]] | None = None
        self.exit_by = math.inf  # after a signal: when the preemption budget runs out
        # Updates skipped for a non-finite loss or gradient norm: logged intervals', this one's.
        self.skipped_total = self.interval_skipped = 0
        self.rollbacks: list[Rollback] = []
        self.rolled_back_steps = 0  # steps trained and then discarded by rollbacks
        self.saved: list[Path] = []

    # ------------------------------------------------------------------ set-up

    def _callbacks(self, own: list[Callback]) -> CallbackList:
        """What hangs off the loop, in the order each event reaches it: the goodput account
        first (it times everything after), evaluation (it adds to a log step's record), the
        user's callbacks, then the writers. Files, trackers and the logs' copy in the bucket
        belong to the global main process."""
        trackers = self.trackers = Trackers(self)
        self.metrics_file = self.log_mirror = None
        if self.main:
            self.metrics_file = MetricsFile(self.output_dir / "metrics.jsonl", self.state.step)
            self.log_mirror = LogMirror(self, trackers.flush)
        self.goodput = Goodput(self)
        return CallbackList([
            self.goodput, Evaluation(), *configured_callbacks(self), *own,
            *([SpikeWatch(self.config.spike_zscore)] if self.config.spike_zscore else []),
            ProgressBar(),
            *[c for c in (self.metrics_file, trackers, self.log_mirror) if c is not None]])

    def _checkpointing(self) -> tuple[CheckpointPublisher, Saver]:
        """The background publisher (marks, uploads, prunes; main process) and the saver."""
        publisher = CheckpointPublisher.for_run(self.store, f"checkpoints/{self.config.run_name}",
                                                self.config.retention, self.main, self.say)
        if self.claim is not None:  # another run taking the name over stops uploads at once
            publisher.ownership_lost = lambda: self.claim.lost
        if self.main:
            publisher.catch_up(self.ckpt_root)  # a kill may have cut the last upload short
        saver = Saver(self.engine, publisher, self.ckpt_root,
                      tokenizer_dir(self.task.meta, Path(self.config.data_dir)),
                      self.metrics_file.writer if self.metrics_file else None, self.say)
        return publisher, saver

    def _resume(self) -> TrainState:
        config, engine, task = self.config, self.engine, self.task
        resume_from = resolve_resume(config, engine, self.ckpt_root, self.store)
        state = TrainState(num_files=task.num_files, train_windows=len(task.train_idx),
                           world_size=engine.num_processes,
                           global_batch_windows=config.per_device_train_batch_size
                           * engine.num_processes, seed=config.seed,
                           position=task.start_position(),
                           run_id=engine.broadcast_object([lineage.new_run_id()])[0])
        if resume_from is not None:
            continue_from(state, self.engine.load(resume_from), resume_from, self.say,
                          allow_seed_change=config.allow_seed_change)
            engine.schedule.calm_until = state.lr_calm_until
        elif config.resume:
            self.say("no complete checkpoint found: starting from scratch")
        return state

    def _meter(self, info: ModelInfo) -> ThroughputMeter:
        flops = flops_per_token(info.non_embedding_params, info.num_layers, info.hidden_size,
                                self.config.seq_len,
                                output_embedding_params=info.vocab_size * info.hidden_size)
        return ThroughputMeter(flops, info.peak_flops, self.engine.num_processes)

    def _banner(self) -> None:
        config, info, task, state = self.config, self.info, self.task, self.state
        sequences = state.global_batch_windows * config.gradient_accumulation_steps
        self.say(f"model {config.model}: {info.total_params:,} parameters "
                 f"({info.non_embedding_params:,} without embeddings, "
                 f"{info.trainable_params:,} trainable), vocab {info.vocab_size}, stage "
                 f"{config.stage}; {info.description}")
        self.say(f"batch: {config.per_device_train_batch_size} per device x "
                 f"{config.gradient_accumulation_steps} accumulation x "
                 f"{self.engine.num_processes} processes = {sequences} sequences "
                 f"({sequences * config.seq_len:,} tokens) per optimizer step; "
                 f"{task.num_files} files, {len(task.train_idx):,} training examples, "
                 f"{len(task.eval_idx)} held out")

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Train to ``max_steps`` (or a preemption); returns the run's summary."""
        config, state, emit = self.config, self.state, self.callbacks.emit
        start_step, start_tokens, started = state.step, state.tokens_seen, time.perf_counter()
        try:
            emit("pre_train", self)
            self.meter.reset()
            with uploads_survive_an_abort(self.saver, self.publisher, config, self.say,
                                          on_abort=lambda err: emit("on_error", self, err)):
                while state.step < config.max_steps and not self.stopped_early:
                    emit("pre_step", self)
                    try:
                        self._step()
                    except WaitStopped:  # a signal while the readers waited for a shard
                        self._save_finished_steps(start_step)
                        self.stopped_early = True
                        continue
                    emit("post_step", self)
                    self.stopped_early = self._after_step()
                if self.pending_votes is not None:
                    self.pending_votes()  # the last exchange: no collective left in flight
            emit("post_train", self)
            elapsed = time.perf_counter() - started
            return self._finish(start_step, start_tokens, elapsed)
        finally:
            self._close_callbacks()
            if self.task.feed is not None:
                self.stop_watch.close()
                self.task.feed.close()
            if self.claim is not None:  # a bucket that hangs must not hold the exit
                self.claim.release(RELEASE_S if self.budget_left() is None else
                                   min(RELEASE_AFTER_SIGNAL_S, self.budget_left()))

    def due(self, every: int) -> bool:
        """Whether an action every ``every`` steps is due after this step (and the last)."""
        return due(self.state.step, every, self.config.max_steps)

    def log_metrics(self, record: dict) -> None:
        """Send a record through the callbacks (evaluation adds to it, writers write it)."""
        self.callbacks.emit("log_metrics", self, record)
        if record["step"] > 0:  # a baseline before training is not the run's result
            self.latest.update(record)

    def _step(self) -> None:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        task, engine = self.task, self.engine
        waiting = time.perf_counter()
        micro = [next(self.batches) for _ in range(self.config.gradient_accumulation_steps)]
        self.timings["data_wait"] += time.perf_counter() - waiting
        tokens = sum(task.count_tokens(b) for b in micro)
        targets = sum(task.count_targets(b) for b in micro) if task.count_targets else 0
        if task.stage == "pretrain":  # every window holds seq_len tokens, on every process
            tokens *= engine.num_processes
        else:  # padded batches differ from process to process: count what each one had
            tokens, targets = (int(v) for v in engine.all_sum([tokens, targets]))
        # SFT: each micro-batch's summed loss is divided by the step's answer tokens per
        # micro-batch and process, so that after the engines' averaging every token weighs
        # alike, whatever the accumulation and the number of processes.
        per_micro = targets / (len(micro) * engine.num_processes) if task.count_targets else None
        engine.train_step(micro, self.state.step, per_micro)
        self.state.step += 1
        self.state.tokens_seen += tokens
        self.state.position = self.sampler.position
        if self.task.feed is not None:
            self.task.feed.follow(self.state.position)
        self.interval_steps += 1
        self.meter.add(tokens)

    def _after_step(self) -> bool:
        """Log, evaluate, save as due; True when the run must stop (preemption)."""
        config, step = self.config, self.state.step
        log_now = due(step, config.logging_steps, config.max_steps)
        save_now = due(step, config.save_steps, config.max_steps)
        stop_now, on_time, lost = self._exchange_flags()
        if lost:
            raise TrainingError(self._ownership_problem() or f"run {config.run_name!r} was "
                                f"taken over by another run; this run stopped")
        save_now = save_now or on_time
        if log_now or save_now or stop_now:
            means, grad_norm = self._read_interval()
            if means is None:  # rolled back: nothing of the discarded steps is logged or saved
                log_now, save_now = False, False
        if log_now:
            self._log(means, grad_norm)
        if save_now or stop_now:
            self.saved.append(self._save())
            self.meter.reset()
        if stop_now:
            self.say(f"stopping at step {step} on request; checkpoint {self.saved[-1].name}")
        return stop_now

    def _save_finished_steps(self, start_step: int) -> None:
        """A signal came while the readers waited for a shard (a streaming outage): the step
        under way cannot finish, so the finished ones are saved (their data position: the
        resumed run repeats and skips no window), unless a checkpoint already holds them."""
        step = self.state.step
        if step > (step_of(self.saved[-1].name) if self.saved else start_step):
            if self.interval_steps:
                self._read_interval()
            self.saved.append(self._save())
        self.say(f"stopping at step {step} on request while waiting for data from the bucket; "
                 + (f"checkpoint {self.saved[-1].name}" if self.saved
                    else f"no step finished since step {start_step}: nothing to save"))

    def _ownership_problem(self) -> str:
        """Why this run may no longer write its checkpoints ('' while it may): its lease was
        taken over, or the bucket holds another run's checkpoint where it would write."""
        return (self.claim.lost if self.claim is not None else "") or self.publisher.conflict

    def _exchange_flags(self) -> tuple[bool, bool, bool]:
        """(a process was asked to stop, the main process says a timed save is due, the main
        process lost the run to another one), agreed on by all processes without a per-step
        sync.

        Each step starts the exchange of this process's flags and reads the one started a
        step earlier (arrived by now): every process stops or saves after the same step, at
        most two steps after the signal. One process needs no exchange."""
        minutes = self.config.save_interval_minutes
        on_time = (self.main and minutes > 0
                   and time.monotonic() - self.last_save >= minutes * 60)
        flags = [float(self.preemption.requested), float(on_time),
                 float(bool(self.main and self._ownership_problem()))]
        if self.engine.num_processes == 1:
            return flags[0] > 0, flags[1] > 0, flags[2] > 0
        previous, self.pending_votes = self.pending_votes, self.engine.all_sum_later(flags)
        agreed = previous() if previous is not None else [0.0, 0.0, 0.0]
        return agreed[0] > 0, agreed[1] > 0, agreed[2] > 0

    def _roll_back(self, run: int, skipped: int) -> None:
        """Back to the newest checkpoint of the line, the data position kept (see
        ``utils.loop.rollback``); the interval starts afresh, the event is recorded."""
        self.saver.wait()  # the checkpoint being written may be the one to go back to,
        self.publisher.wait_marked()  # once it counts (its marker written)
        config = self.config
        per_step = (config.per_device_train_batch_size * config.gradient_accumulation_steps
                    * self.engine.num_processes)
        event = roll_back(self.engine, self.state, self.ckpt_root, self.store,
                          f"checkpoints/{config.run_name}", run, per_step,
                          config.rollback_lr_steps)
        self.rollbacks.append(event)
        self.rolled_back_steps += event.from_step - event.to_step
        self.say(event.line())
        self.engine.reset_interval()
        self.skipped_total += skipped
        self.interval_steps = self.interval_skipped = 0
        self.meter.reset()
        if self.main:
            self.metrics_file.writer.write(event.record())
            self.trackers.log(self, {"step": event.to_step, "rollbacks": len(self.rollbacks)})

    def _read_interval(self) -> tuple[dict[str, float] | None, float]:
        """The interval's means over the updates that were applied, checked: a run of skipped
        updates over the limit, or a non-finite loss among the applied ones, stops the run."""
        sums, grad_norm = self.engine.read_interval()
        skipped, run = int(sums.pop("skipped_steps", 0)), int(sums.pop("skip_run", 0))
        if run > self.config.max_skipped_steps:
            if len(self.rollbacks) >= self.config.max_rollbacks:
                raise skips_problem(run, self.state.step, self.config.max_skipped_steps,
                                    self.ckpt_root, self.rollbacks)
            self._roll_back(run, skipped)
            return None, grad_norm
        kept = self.interval_steps - skipped / self.task.passes
        means = {key: value / kept if kept > 0 else math.nan for key, value in sums.items()}
        if kept > 0:
            check_loss(means["loss"], self.state.step, self.ckpt_root)
        self.interval_skipped = means["skipped_steps"] = skipped
        return means, grad_norm

    def _log(self, means: dict[str, float], grad_norm: float) -> None:
        config, state, steps = self.config, self.state, self.interval_steps
        means = dict(means)
        # The LR of the next step (as torch's scheduler.get_last_lr() reports it).
        lr = self.engine.schedule.lr(state.step)
        record = {"step": state.step, "loss": means.pop("loss"), "lr": lr,
                  "grad_norm": grad_norm, "epoch": state.position.epoch,
                  "tokens_seen": state.tokens_seen, **self.meter.read(),
                  "memory_gib": self.engine.memory_gib(), **means}
        record["step_time_s"] /= steps
        if self.task.sources is not None:  # --data-mix: how much of each source so far
            record["tokens_by_source"] = {name: windows * config.seq_len for name, windows
                                          in self.sampler.taken_by_source().items()}
        record["eta_s"] = record["step_time_s"] * (config.max_steps - state.step)
        self.log_metrics(record)
        self.engine.reset_interval()
        if self.interval_skipped:
            self.say(f"skipped {self.interval_skipped} update(s) with a non-finite loss or "
                     f"gradient norm in the {steps} steps up to step {state.step}")
        self.skipped_total, self.interval_skipped = self.skipped_total + self.interval_skipped, 0
        self.interval_steps = 0
        self.meter.reset()  # eval time is not training throughput

    def _save(self) -> Path:
        started = self.last_save = time.monotonic()
        path = self.saver.save(self.state, self.config.record())
        self.timings["checkpoints"] += time.monotonic() - started
        self.callbacks.emit("post_checkpoint_saved", self, path)
        return path

    # ------------------------------------------------------------------ the end

    def _finish(self, start_step: int, start_tokens: int, elapsed: float) -> dict:
        config, stopped_early = self.config, self.stopped_early
        waits_started = time.perf_counter()
        if stopped_early:
            uploads_done = self._within_the_budget()
        else:
            self.saver.wait()  # the last checkpoint is written, then uploaded
            uploads_done = finish_uploads(self.publisher, config, self.budget_left, EXIT_S)
        self.timings["checkpoints"] += time.perf_counter() - waits_started
        self._close_callbacks()  # after a signal the logs get what the checkpoint left
        if config.merge and config.stage != "pretrain" and not stopped_early:
            if self.main:  # from the final checkpoint, complete by now
                merged = self.engine.merge(self.saved[-1] if self.saved
                                           else find_complete(self.ckpt_root)[-1],
                                           self.output_dir / "merged")
                self.say(f"merged model (base + adapters) written to {merged}")
            self.engine.wait_for_everyone()
        summary, table = run_summary(
            config=config, state=self.state, start_step=start_step, start_tokens=start_tokens,
            elapsed=elapsed, last_loss=self.latest.get("loss", math.nan),
            eval_loss=self.latest.get(self.task.eval_metric, math.nan),
            saved=self.saved, uploads_done=uploads_done, stopped_early=stopped_early,
            where=self.engine.where, ckpt_root=self.ckpt_root, store=self.store,
            local_only=self.publisher.local_only, saving=self.saver.totals(),
            streamed=self.task.feed.summary() if self.task.feed is not None else "",
            logs_mirror=self.log_mirror.copied_to if self.log_mirror is not None else "",
            skipped_steps=self.skipped_total + self.interval_skipped, goodput=self.goodput.line,
            rollbacks=[r.line() for r in self.rollbacks])
        self.say(table)
        return summary

    def _close_callbacks(self) -> None:
        """The callbacks' ``close``, once: at a normal end before the summary (so the logs
        copied to the bucket hold the whole run), else on the way out."""
        if not self._closed:
            self._closed = True
            self.callbacks.emit("close", self)

    def budget_left(self) -> float | None:
        """Seconds left of the preemption budget (less ``EXIT_S``) once a stop was requested
        (recorded in ``exit_by``, which bounds every wait to the exit); None before."""
        if self.preemption.requested:
            self.exit_by = min(self.exit_by,
                               self.preemption.at + self.config.preemption_budget_s - EXIT_S)
        return None if math.isinf(self.exit_by) else max(0.0, self.exit_by - time.monotonic())


    def _within_the_budget(self) -> bool:
        """After a signal: the local checkpoint complete first (written, then marked), then
        as much upload as fits ``--preemption-budget-s`` from the signal, less ``EXIT_S`` for
        the process to exit; whatever the bucket does. The last lines say what happened (and,
        on Compute Engine, what the VM will do)."""
        # A process the signal did not reach (another rank was signalled) counts from now.
        signalled_at = self.preemption.at if self.preemption.requested else time.monotonic()
        deadline = self.exit_by = signalled_at + self.config.preemption_budget_s - EXIT_S
        facts = preemption_facts() if self.main else None  # while the write runs
        self.saver.wait(max(0.0, deadline - time.monotonic()))
        uploads_done = self.publisher.close(timeout=0.0 if self.saver.writing
                                            else max(0.0, deadline - time.monotonic()))
        if self.main and self.saved:
            self.say(preemption_report(self.state.step, self.saved[-1].name, self.saver,
                                       self.publisher, self.config.preemption_budget_s, facts))
        return uploads_done


def train(config: TrainingConfig, engine: Engine) -> dict:
    """Run one stage with ``engine``; returns the end-of-run summary."""
    return Trainer(config, engine).run()
