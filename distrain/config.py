"""Config: YAML file -> dot-list overrides -> typed, validated dataclasses.

Every mistake a user can make raises ConfigError naming the key; the CLI turns it
into one line on stderr and exit code 2.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from .typed import ConfigError, apply_override, build_section, suggest

__all__ = ["ConfigError", "Config", "load_config", "apply_override", "batch_layout", "to_dict", "to_yaml"]


@dataclass
class RunConfig:
    name: str = "run"
    dir: Optional[str] = None  # default runs/<name>
    seed: int = 0
    overwrite: bool = False  # with checkpoint.resume=never, allow reusing a run dir
    lock_wait_s: float = 30.0  # how long a launch waits for a predecessor on the same run dir to exit


@dataclass
class ModelConfig:
    name: str = "mlp"
    init_from: Optional[str] = None  # weights to start from on a fresh start: HF dir, .safetensors or .pt
    init_strict: bool = True  # false: load the keys that match, leave the rest as built
    lora: Optional[dict] = None  # {r, alpha, dropout, target_modules}: train LoRA adapters (peft) on a frozen base
    args: dict = field(default_factory=dict)  # builder kwargs, written beside `name`


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    download: bool = False
    global_batch_size: int = 64
    micro_batch_size: Optional[int] = None
    eval_batch_size: int = 256
    num_workers: int = 0
    args: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SchedConfig:
    name: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = 0
    step_size: int = 1000  # step: decay every step_size steps
    gamma: float = 0.1  # step: decay factor
    min_lr_ratio: float = 0.0  # cosine: floor as a fraction of optim.lr


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None
    epochs: Optional[int] = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: Optional[float] = None
    eval_every: int = 0  # 0: only at the end
    log_every: int = 10
    gc_every: int = 50  # Python's garbage collection, every rank at the same step; 0: Python's automatic one
    compile: bool = False
    activation_checkpointing: bool = False
    on_nonfinite: Literal["skip", "stop"] = "stop"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss: str = "task"  # task | model (the loss the model returns) | pkg.module:fn(output, batch) -> (sum, count)


@dataclass
class StrategyConfig:
    name: Literal["single", "dp", "ddp", "fsdp", "deepspeed"] = "single"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    zero_stage: int = 2
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    timeout_s: int = 600
    shared_memory: bool = True  # CPU ranks all on one machine: gradients and per-step agreement through it
    deepspeed: dict = field(default_factory=dict)  # passthrough of extra DeepSpeed config keys
    fsdp_blocks: list = field(default_factory=list)  # class names of the blocks FSDP2 shards one by one


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only the final checkpoint
    keep_last: int = 3
    resume: str = "auto"  # auto | never | <path>
    allow_config_change: bool = False
    async_save: bool = False
    preempt_signals: list = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])


@dataclass
class LogConfig:
    tensorboard: bool = False
    progress: Literal["auto", "on", "off"] = "auto"
    watchdog_s: int = 0  # 0: off
    straggler_factor: float = 2.0  # warn about a rank slower than this x the median; 0: off
    level: Literal["debug", "info", "warning"] = "info"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")


# Sections whose unknown keys are builder arguments, checked later against the builder.
_OPEN_SECTIONS = {"model", "data"}


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("", f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("", f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
        if not isinstance(raw, dict):
            raise ConfigError("", f"config file {path} must hold a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def from_dict(raw: dict) -> Config:
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(name, f"unknown section{suggest(name, _SECTION_TYPES)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(name, "must be a mapping")
        sections[name] = build_section(name, _SECTION_TYPES[name], value, _OPEN_SECTIONS)
    return Config(**sections)


def validate(cfg: Config) -> None:
    t, d = cfg.train, cfg.data
    if (t.max_steps is None) == (t.epochs is None):
        raise ConfigError("train.max_steps", "set exactly one of train.max_steps and train.epochs")
    for key, value in (("train.max_steps", t.max_steps), ("train.epochs", t.epochs)):
        if value is not None and value <= 0:
            raise ConfigError(key, f"must be > 0 (got {value})")
    _positive("optim.lr", cfg.optim.lr)
    _positive("data.global_batch_size", d.global_batch_size)
    _positive("data.eval_batch_size", d.eval_batch_size)
    if d.micro_batch_size is not None:
        _positive("data.micro_batch_size", d.micro_batch_size)
    _non_negative("optim.weight_decay", cfg.optim.weight_decay)
    _non_negative("optim.momentum", cfg.optim.momentum)
    _non_negative("data.num_workers", d.num_workers)
    _non_negative("train.eval_every", t.eval_every)
    _positive("train.log_every", t.log_every)
    if t.loss not in ("task", "model") and ":" not in t.loss:
        raise ConfigError("train.loss", f"must be task, model or pkg.module:fn (got {t.loss!r})"
                                        f"{suggest(t.loss, ('task', 'model'))}")
    _non_negative("train.gc_every", t.gc_every)
    _positive("strategy.timeout_s", cfg.strategy.timeout_s)
    _non_negative("run.lock_wait_s", cfg.run.lock_wait_s)
    _non_negative("checkpoint.every_steps", cfg.checkpoint.every_steps)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    _non_negative("log.watchdog_s", cfg.log.watchdog_s)
    _non_negative("sched.warmup_steps", cfg.sched.warmup_steps)
    _positive("sched.step_size", cfg.sched.step_size)
    if t.grad_clip is not None:
        _positive("train.grad_clip", t.grad_clip)
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1) (got {cfg.optim.betas!r})")
    if cfg.optim.nesterov and (cfg.optim.name != "sgd" or cfg.optim.momentum <= 0):
        raise ConfigError("optim.nesterov", "needs optim.name=sgd and optim.momentum > 0")
    import signal

    for name in cfg.checkpoint.preempt_signals:
        if not isinstance(getattr(signal, str(name), None), signal.Signals):
            raise ConfigError("checkpoint.preempt_signals", f"unknown signal {name!r} (e.g. SIGUSR1, SIGTERM)")
    if cfg.strategy.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("strategy.zero_stage", f"must be 0, 1, 2 or 3 (got {cfg.strategy.zero_stage})")


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, accumulation steps) for this world size, per DESIGN.md."""
    g = cfg.data.global_batch_size
    if g % world_size:
        raise ConfigError("data.global_batch_size", f"{g} is not divisible by the world size {world_size}")
    per_rank = g // world_size
    micro = cfg.data.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(
            "data.micro_batch_size",
            f"{micro} does not divide the per-rank batch {per_rank} (global {g} / world size {world_size})",
        )
    return micro, per_rank // micro


def to_dict(cfg: Config) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        section = dataclasses.asdict(getattr(cfg, f.name))
        if "args" in section:
            section.update(section.pop("args"))
        out[f.name] = section
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _positive(key, value):
    if value <= 0:
        raise ConfigError(key, f"must be > 0 (got {value})")


def _non_negative(key, value):
    if value < 0:
        raise ConfigError(key, f"must be >= 0 (got {value})")


_SECTION_TYPES = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


# keys whose change alters the optimization; the world size and micro batch may change freely
OPTIMIZATION_KEYS = ("model", "optim", "sched", "run.seed", "data.name", "data.global_batch_size",
                     "train.grad_clip", "train.precision", "train.loss")
RUNTIME_DATA_KEYS = {"root", "download", "micro_batch_size", "eval_batch_size", "num_workers"}
# where a fresh start takes its weights from: a resume takes the checkpoint's
START_ONLY_MODEL_KEYS = {"init_from", "init_strict"}


def config_changes(old: dict, new: dict) -> list[str]:
    """The keys, among those that alter the optimization, whose values differ between two resolved configs."""
    changed = []
    for key in OPTIMIZATION_KEYS:
        section, _, name = key.partition(".")
        a, b = old.get(section, {}), new.get(section, {})
        if name:  # a key added since the checkpoint was written is not compared
            a, b = a.get(name, b.get(name)), b.get(name)
            if a != b:
                changed.append(key)
        else:
            changed += [f"{section}.{k}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k) and not (section == "model" and k in START_ONLY_MODEL_KEYS)]
    a, b = old.get("data", {}), new.get("data", {})
    changed += [f"data.{k}" for k in sorted(set(a) | set(b))
                if k not in RUNTIME_DATA_KEYS and f"data.{k}" not in changed and a.get(k) != b.get(k)]
    return changed
