"""Dataset registry. User datasets by import path "pkg.module:fn" returning (train, eval, meta)."""
from __future__ import annotations

from ..config import DataConfig
from ..imports import call_with, resolve
from .datasets import cifar10, digits, mnist, synthetic, text
from .hf_datasets import hf_dataset
from .tokens import prepared_corpus

DATASETS = {"digits": digits, "mnist": mnist, "cifar10": cifar10, "synthetic": synthetic, "text": text,
            "tokens": prepared_corpus, "hf_datasets": hf_dataset}


def build_datasets(cfg: DataConfig):
    builder = resolve("data.name", cfg.name, DATASETS)
    train, evaluation, meta = call_with("data", builder, cfg.args, {"root": cfg.root, "download": cfg.download})
    meta.setdefault("task", "classification")
    return train, evaluation, meta
