"""The training loop. It owns the step and the data position; everything that differs
between strategies stays behind the Strategy protocol."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass

import torch

from . import collector, dist
from .checkpoint import weights_finite
from .config import ConfigError
from .data.batch import call_model, check_batch, collate_fn, to_device
from .data.loader import StepLoader
from .data.sampler import ResumableSampler
from .data.shards import in_memory, is_stream
from .data.streams import stream_loader
from .evaluate import evaluate, fetch
from .metrics import Window, flops_per_sample, peak_flops, peak_memory_mb, stragglers, typical
from .objectives import StepScale, build_objective, items_per_sample
from .optim import lr_at, set_lr
from .progress import Progress
from .watchdog import NoWatchdog, Phases

log = logging.getLogger("distrain")


class NonFiniteError(RuntimeError):
    pass


@dataclass
class Data:
    train: object
    eval: object
    meta: dict
    micro_batch: int
    device: torch.device  # where batches go


@dataclass
class Parts:
    """What the loop reports to and is stopped by; each one always present (stand-ins where off)."""
    comm: dist.Collectives
    checkpointer: object  # checkpoint.Checkpointer
    metrics: object  # log.MetricsWriter
    preemption: object  # preempt.Preemption
    watchdog: object = None


class Trainer:
    def __init__(self, cfg, strategy, data: Data, parts: Parts, interactive: bool = False):
        self.cfg, self.strategy, self.meta = cfg, strategy, data.meta
        self.train_set, self.collate = data.train, collate_fn(data.meta)
        self.comm, self.checkpointer, self.metrics = parts.comm, parts.checkpointer, parts.metrics
        self.preemption, self.watchdog = parts.preemption, parts.watchdog or NoWatchdog()
        self.phases = Phases(self.watchdog)
        self.interactive = interactive
        self.device = data.device
        self.world_size, self.rank = dist.world_size(), dist.rank()
        self.eval_set = in_memory(data.eval)
        if is_stream(data.train):  # the loader keeps the position: per shard, not one number
            self.loader = self.sampler = stream_loader(cfg, data, self.comm, self.world_size, self.rank, self.collate)
            self.total_steps = cfg.train.max_steps or math.inf  # or until train.epochs passes end
        else:
            self.sampler = ResumableSampler(len(data.train), cfg.data.global_batch_size, data.micro_batch,
                                            self.world_size, self.rank, cfg.run.seed)
            self.loader = StepLoader(data.train, self.sampler, self.device, cfg.data.num_workers, cfg.run.seed,
                                     self.rank, self.collate)
            self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.sampler.steps_per_epoch
        self.step = 0
        self.skipped_steps = 0
        self.norms: list = []  # (step, 0-dim norm tensor) not yet read: read at log lines, checkpoints, the end
        self.last_eval: dict | None = None
        self.best_eval: dict | None = None
        self.objective = build_objective(cfg.train.loss, data.meta["task"], strategy.module)
        # compiled with the model: the loss over a large vocabulary is a fused pass, not three kernels
        self.loss = torch.compile(self.objective.loss) if cfg.train.compile else self.objective.loss
        self.scale = StepScale(self.objective, self.comm, self.world_size, items_per_sample(data.train, self.objective))
        self.flops_per_sample = flops_per_sample(strategy.module, data.meta)
        self.loss_on_host = self.device.type == "cpu"  # reading a CPU loss waits for nothing
        self.peak_flops = peak_flops(self.device)

    # -- what a checkpoint holds besides the strategy's model and optimizer state
    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "data": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        self.sampler.load_state_dict(state["data"])
        self.loader.reset()

    def fit(self, on_start=None) -> dict:
        """Resume if there is something to resume, call `on_start()`, then train to the end."""
        try:
            self.check_first_batch()
            self.resume()
            if on_start is not None:
                on_start()
            return self._fit()
        finally:
            self.loader.close()
            self.watchdog.phase = "done"

    def check_first_batch(self) -> None:
        """Before anything is written: the first samples, batched, through the model and the loss,
        so that a batch the model cannot take, or an output the loss cannot use, is a config
        error naming the key or the model (exit 2), not a failure at step 1."""
        try:
            batch = to_device(self.loader.first_batch(), self.device) if is_stream(self.train_set) else \
                fetch(self.train_set, range(min(2, len(self.train_set))), self.device, self.collate)
        except (RuntimeError, TypeError, ValueError) as e:  # torch's default collate on ragged samples, say
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError("data.name", f"the first training samples do not make a batch ({first_line}); samples "
                                           "of different shapes need a padding collator as meta['collate']")
        check_batch(self.strategy.module, batch)
        model = self.strategy.model
        model.eval()  # no dropout draw, no batch-norm update: the run's state is untouched
        with torch.no_grad(), self.strategy.micro_step(sync=True):
            self.objective.loss(call_model(model, batch, self.objective.without_labels), batch)
        model.train()

    def resume(self) -> None:
        path = self.checkpointer.maybe_resume()
        if path is not None:
            log.info("resumed from %s at step %d (epoch %d, %d samples into it)", path, self.step,
                     self.sampler.epoch, self.sampler.position)

    def _fit(self) -> dict:
        cfg = self.cfg
        progress = Progress(cfg.log.progress, self.interactive, self.rank == 0,
                            None if math.isinf(self.total_steps) else self.total_steps, self.step)
        window, start, first_step = Window(), time.perf_counter(), self.step
        # a window's time is the loop's wall time, its log lines and collections included, less
        # evaluations and checkpoints (not training throughput)
        mark = start
        with contextlib.closing(progress), collector.lockstep(cfg.train.gc_every) as collect:
            while self.step < self.total_steps and not self.loader.finished:
                losses, samples = self.train_step()
                self.step += 1
                self.watchdog.step = self.step
                collect(self.step)
                now = time.perf_counter()
                window.add(losses, samples, now - mark, self.phases.seconds.get("data", 0.0),
                           self.phases.take("data", "forward"))
                mark = now
                last = self.step == self.total_steps or self.loader.finished
                if self.step % cfg.train.log_every == 0 or last:
                    self.log_train(window, progress)
                    window = Window()
                progress.update(self.step)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and not last:
                    mark += self.timed(self.run_eval)
                if self.checkpointer.due(self.step) and not last:
                    mark += self.timed(self.save_checkpoint)
                if self.preemption.should_stop():
                    self.preemption.drain()
                    log.warning("preemption signal: checkpointing at step %d and exiting for a requeue", self.step)
                    self.save_checkpoint(blocking=True)
                    return self.summary(start, first_step, preempted=True)
        self.preemption.drain()
        self.read_norms()
        self.run_eval()
        self.save_checkpoint(blocking=True)
        return self.summary(start, first_step, preempted=False)

    @staticmethod
    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def train_step(self):
        s, phase = self.strategy, self.phases
        with phase("data"):
            batch, micro = self.loader.next_step()
        set_lr(s.optimizer, lr_at(self.step, self.cfg.optim.lr, self.cfg.sched, self.total_steps))
        plain = not self.cfg.train.compile and self.scale.plain_mean(batch)
        losses, grad_scale = (self.mean_step if plain else self.sum_steps)(batch, micro)
        with phase("optimizer"):
            self.norms.append((self.step + 1, s.step(self.cfg.train.grad_clip, grad_scale)))
        return losses, batch.global_size

    def sum_steps(self, batch, micro: list):
        s, phase = self.strategy, self.phases
        with phase("count"):
            scale = self.scale.before(batch, micro)  # 1 / the step's item count over all ranks (objectives)
        losses, last = [], len(micro) - 1  # (micro-batch mean loss, items) pairs, summed only at log lines
        for i, (mb, real) in enumerate(zip(micro, batch.real)):
            with s.micro_step(sync=i == last):
                with phase("forward"):
                    loss_sum, count = self.loss(call_model(s.model, mb, self.objective.without_labels), mb)
                with phase("backward"):
                    # every micro-batch's sum over the global count: the gradient is the mean over the
                    # global batch's items however they are split (a stand-in micro-batch counts nothing)
                    s.backward(loss_sum * (scale if real else 0.0))
            if real:
                losses.append(self.mean_and_count(loss_sum, count))
        return losses, self.scale.after(batch, [n for _, n in losses])  # counts known only now: rescale

    def mean_step(self, batch, micro: list):
        """StepScale.plain_mean's step (not under train.compile: that compiles the (sum, count) loss)."""
        s, phase, mb, items = self.strategy, self.phases, micro[0], batch.real[0] * self.scale.items_per_sample
        with s.micro_step(sync=True):
            with phase("forward"):
                loss = self.objective.mean(call_model(s.model, mb, self.objective.without_labels), mb)
            with phase("backward"):
                s.backward(loss)
        return [(loss.item() if self.loss_on_host else loss.detach(), items)], None

    def mean_and_count(self, loss_sum, count):
        if self.loss_on_host:
            count = int(count)
            return loss_sum.item() / max(count, 1), count
        return loss_sum.detach() / torch.clamp(count, min=1), count

    def read_norms(self) -> float:
        """The newest step's gradient norm; accounts for the steps whose update was skipped since
        the last read (read at log lines, checkpoints and the end: on a GPU, reading each step would
        stall the host; a stop comes at most train.log_every steps late and no bad update is applied)."""
        if not self.norms:
            return math.nan
        norms, self.norms = self.norms, []
        values = torch.stack([n.float().cpu() for _, n in norms]).tolist()
        for (number, _), value in zip(norms, values):
            if not math.isfinite(value):
                self.skipped(number)
        return values[-1]

    def skipped(self, number: int) -> None:
        self.skipped_steps += 1
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient norm at step {number}; the update was not "
                                 "applied (train.on_nonfinite=skip skips such steps instead)")
        log.warning("step %d: non-finite loss or gradient norm, update skipped (%d so far)", number, self.skipped_steps)

    def log_train(self, window: Window, progress: Progress) -> None:
        grad_norm = self.read_norms()
        loss, busy = window.reduce(self.comm)
        samples_per_s = window.samples / window.time
        record = {"step": self.step, "epoch": self.sampler.epoch, "split": "train", "loss": loss,
                  "lr": self.strategy.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                  "step_time_s": window.time / window.steps, "data_wait_s": window.data_wait / window.steps,
                  "samples_per_s": samples_per_s, "peak_memory_mb": peak_memory_mb(self.device),
                  "skipped_steps": self.skipped_steps}
        if self.meta["task"] == "lm" and "seq_len" in self.meta:
            record["tokens_per_s"] = samples_per_s * self.meta["seq_len"]
        if self.flops_per_sample and self.peak_flops:
            record["mfu"] = samples_per_s * self.flops_per_sample / (self.peak_flops * self.world_size)
        if len(busy) > 1:  # every rank waits for the slowest at each step's all-reduce
            slowest = max(range(len(busy)), key=busy.__getitem__)
            record.update(busy_max_s=busy[slowest], busy_min_s=min(busy), slowest_rank=slowest)
        self.metrics.write(record)
        slow = stragglers(busy, self.cfg.log.straggler_factor)
        if slow and self.rank == 0:
            log.warning("straggler: rank(s) %s spend %s s per step on their own work (data + forward), median %.4f s",
                        ", ".join(map(str, slow)), ", ".join(f"{busy[r]:.4f}" for r in slow), typical(busy))
        progress.update(self.step, loss=f"{loss:.4f}")
        log.info("step %d/%s  loss %.4f  lr %.3g  %.0f samples/s", self.step, self.total_steps, loss,
                 record["lr"], samples_per_s, extra={"file_only": progress.active})

    def run_eval(self) -> dict:
        self.watchdog.phase = "eval"
        result = evaluate(self.strategy, self.eval_set, self.objective, self.cfg.data.eval_batch_size,
                          self.device, self.comm, self.collate)
        self.last_eval = {"step": self.step, **result}
        key = "accuracy" if "accuracy" in result else "loss"
        better = max if key == "accuracy" else min
        if self.best_eval is None or better(result[key], self.best_eval[key]) == result[key]:
            self.best_eval = self.last_eval
        self.metrics.write({"step": self.step, "epoch": self.sampler.epoch, "split": "eval", **result})
        acc = f"  accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
        log.info("eval at step %d: loss %.4f%s (%d samples)", self.step, result["loss"], acc, result["samples"])
        self.watchdog.phase = "data"
        return result

    def save_checkpoint(self, blocking: bool = False) -> None:
        self.read_norms()
        self.loader.sync(self.comm)  # a stream's position is spread over the ranks
        self.watchdog.phase = "checkpoint"
        if not weights_finite(self.strategy.module, self.comm):
            raise FloatingPointError(f"refusing to write the checkpoint of step {self.step}: the model holds "
                                     "non-finite weights")
        self.checkpointer.save(self.step, blocking=blocking)
        self.watchdog.phase = "data"

    def summary(self, start: float, first_step: int, preempted: bool) -> dict:
        wall = time.perf_counter() - start
        steps = self.step - first_step
        out = {"steps": self.step, "steps_this_run": steps, "wall_s": wall, "preempted": preempted,
               "samples_per_s": steps * self.cfg.data.global_batch_size / wall if wall > 0 else None,
               "skipped_steps": self.skipped_steps, "last_eval": self.last_eval, "best_eval": self.best_eval,
               "checkpoint": self.checkpointer.latest_path()}
        if self.rank == 0 and self.metrics.enabled:
            (self.cfg.run_dir / "summary.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        return out
