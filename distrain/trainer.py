"""The training loop. It owns the step and the data position; everything that differs
between strategies stays behind the Strategy protocol."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from . import dist
from .config import Config
from .data.loader import StepLoader
from .data.sampler import ResumableSampler
from .evaluate import evaluate
from .optim import lr_at, set_lr
from .tasks import per_sample_loss

log = logging.getLogger("distrain")


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Config, strategy, train_set, eval_set, meta: dict, *, micro_batch: int,
                 device: torch.device, comm_device: torch.device, metrics, checkpointer=None, preemption=None):
        self.cfg, self.strategy, self.meta = cfg, strategy, meta
        self.eval_set, self.device, self.comm_device = eval_set, device, comm_device
        self.metrics, self.checkpointer, self.preemption = metrics, checkpointer, preemption
        self.world_size, self.rank = dist.world_size(), dist.rank()
        self.sampler = ResumableSampler(len(train_set), cfg.data.global_batch_size, micro_batch,
                                        self.world_size, self.rank, cfg.run.seed)
        self.loader = StepLoader(train_set, self.sampler, device, cfg.data.num_workers, cfg.run.seed, self.rank)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.sampler.steps_per_epoch
        self.step = 0
        self.skipped_steps = 0
        self.last_eval: dict | None = None

    # -- what a checkpoint holds besides the strategy's model and optimizer state
    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "data": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        self.sampler.load_state_dict(state["data"])
        self.loader.reset()

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.loader.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.checkpointer is not None:
            self.checkpointer.maybe_resume(self)
        window = _Window(self.comm_device)
        start = time.perf_counter()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            loss_sum, samples, grad_norm, data_wait = self.train_step()
            self.step += 1
            window.add(loss_sum, samples, time.perf_counter() - t0, data_wait)
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                self.log_train(window, grad_norm)
                window = _Window(self.comm_device)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < self.total_steps:
                self.run_eval()
            if self.checkpointer is not None and self.checkpointer.due(self.step) and self.step < self.total_steps:
                self.checkpointer.save(self)
            if self.preemption is not None and self.preemption.should_stop():
                self.preemption.drain()
                log.warning("preemption signal: checkpointing at step %d and exiting for a requeue", self.step)
                self.checkpointer.save(self)
                return {"steps": self.step, "wall_s": time.perf_counter() - start, "eval": self.last_eval,
                        "preempted": True}
        if self.preemption is not None:
            self.preemption.drain()
        self.run_eval()
        if self.checkpointer is not None:
            self.checkpointer.save(self, final=True)
        return {"steps": self.step, "wall_s": time.perf_counter() - start, "eval": self.last_eval, "preempted": False}

    def train_step(self):
        t_data = time.perf_counter()
        batch, micro = self.loader.next_step()
        data_wait = time.perf_counter() - t_data
        s = self.strategy
        set_lr(s.optimizer, lr_at(self.step, self.cfg.optim.lr, self.cfg.sched, self.total_steps))
        # each rank's loss is summed per sample and scaled so the gradient all-reduce's mean over
        # ranks yields the mean over the global batch, however it is split
        scale = self.world_size / batch.global_size
        loss_sum = torch.zeros((), device=self.device)
        last = len(micro) - 1
        for i, ((x, y), real) in enumerate(zip(micro, batch.real)):
            with s.sync(i == last):
                with s.autocast():
                    total = per_sample_loss(self.meta["task"], s.model(x), y).sum()
                s.backward(total * (scale if real else 0.0))
            if real:
                loss_sum += total.detach()
        grad_norm = s.step(self.cfg.train.grad_clip)
        if not torch.isfinite(grad_norm) and self.cfg.strategy.name != "deepspeed":
            self.skipped_steps += 1
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteError(f"non-finite gradient norm at step {self.step + 1}; the update was not applied "
                                     "(train.on_nonfinite=skip would skip such steps)")
            log.warning("step %d: non-finite gradient norm, update skipped (%d so far)", self.step + 1, self.skipped_steps)
        return loss_sum, batch.global_size, grad_norm, data_wait

    def log_train(self, window: "_Window", grad_norm) -> None:
        loss = window.global_mean_loss()
        record = {"step": self.step, "epoch": self.sampler.epoch, "split": "train", "loss": loss,
                  "lr": self.strategy.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                  "step_time_s": window.time / window.steps, "data_wait_s": window.data_wait / window.steps,
                  "samples_per_s": window.samples / window.time, "skipped_steps": self.skipped_steps}
        if self.meta["task"] == "lm":
            record["tokens_per_s"] = record["samples_per_s"] * self.meta["seq_len"]
        self.metrics.write(record)
        log.info("step %d/%d  loss %.4f  lr %.3g  %.0f samples/s", self.step, self.total_steps, loss,
                 record["lr"], record["samples_per_s"])

    def run_eval(self) -> dict:
        result = evaluate(self.strategy, self.eval_set, self.meta["task"], self.cfg.data.eval_batch_size,
                          self.device, self.comm_device)
        self.last_eval = result
        self.metrics.write({"step": self.step, "epoch": self.sampler.epoch, "split": "eval", **result})
        acc = f"  accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
        log.info("eval at step %d: loss %.4f%s (%d samples)", self.step, result["loss"], acc, result["samples"])
        return result


class _Window:
    """Training statistics between two log lines; one all-reduce per log line, none per step."""

    def __init__(self, comm_device):
        self.comm_device = comm_device
        self.loss_sum, self.samples, self.steps, self.time, self.data_wait = 0.0, 0, 0, 0.0, 0.0

    def add(self, loss_sum, samples, seconds, data_wait):
        self.loss_sum = self.loss_sum + loss_sum
        self.samples += samples
        self.steps += 1
        self.time += seconds
        self.data_wait += data_wait

    def global_mean_loss(self) -> float:
        total = dist.all_reduce_sum(torch.as_tensor(self.loss_sum, dtype=torch.float64).reshape(1).to(self.comm_device))
        value = total.item() / max(self.samples, 1)
        return value if math.isfinite(value) else float("nan")
