"""Tiny Hugging Face model configs and dict-batch data for tests: built locally, never
downloaded (2 layers, hidden 64). Data builders are loaded by import path
(`data.name=tests.hf_tiny:masked_tokens`)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB = 64
LLAMA = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# no dropout: runs on different world sizes must be comparable weight for weight
GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 64,
        "bos_token_id": 1, "eos_token_id": 2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
BERT = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64, "pad_token_id": 0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def save_causal_lm(path, config: dict, seed: int, max_shard_size: str):
    """A causal LM of `config` with random weights from `seed`, written by transformers' own
    save_pretrained in shards of at most max_shard_size: a pretrained model for model.init_from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(path, max_shard_size=max_shard_size)
    return path


class DictSamples(Dataset):
    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def masked_samples(n: int, seq_len: int, seed: int, heavy=lambda i: i % 4 == 0) -> list[dict]:
    """Token samples whose labels count either nearly all positions (heavy) or two: a prompt
    that does not count (-100), then the answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (seq_len,), generator=g)
        labels = torch.full((seq_len,), -100)
        keep = seq_len if heavy(i) else 2
        labels[seq_len - keep :] = ids[seq_len - keep :]
        out.append({"input_ids": ids, "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels})
    return out


def masked_tokens(n_train: int = 64, n_eval: int = 24, seq_len: int = 16, seed: int = 0, skew_batch: int = 0,
                  run_seed: int = 0):
    """With skew_batch=G, the samples that land first in each global batch of G in epoch 0
    (the sampler's permutation for run.seed=run_seed) are heavy: on 2 ranks, rank 0 counts
    ~6x the tokens of rank 1, and its micro-batches differ from each other too."""
    heavy = lambda i: i % 4 == 0  # noqa: E731
    if skew_batch:
        from distrain.data.sampler import epoch_permutation

        position = {int(s): p for p, s in enumerate(epoch_permutation(n_train, run_seed, 0))}
        heavy = lambda i: i < n_train and position[i] % skew_batch < 3 * skew_batch // 8  # noqa: E731
    samples = masked_samples(n_train + n_eval, seq_len, seed, heavy)
    meta = {"task": "lm", "vocab_size": VOCAB, "seq_len": seq_len}
    return DictSamples(samples[:n_train]), DictSamples(samples[n_train:]), meta


def naive_mean(output, batch):
    """What an accumulation loop that averages per-micro-batch means computes: each micro-batch
    counts as one item, whatever its number of tokens."""
    logits, labels = output["logits"][:, :-1].float(), batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), 1


def killable_hf(config: dict, task: str | None = None, vocab_size: int | None = None, kill_at: int = -1,
                marker: str = ""):
    """An hf model that SIGKILLs its own process at the kill_at-th training forward, once per
    run (a marker file per rank), through a forward pre-hook: the model keeps its class and
    its forward signature, as distrain checks them."""
    import os
    import signal
    from pathlib import Path

    from distrain.models.hf import hf

    model = hf(config=config, task=task, vocab_size=vocab_size)
    forwards = [0]

    def maybe_die(module, args, kwargs):
        if module.training:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            mine = Path(f"{marker}.rank{rank}")
            if forwards[0] == kill_at and marker and not list(mine.parent.glob(f"{mine.name.rsplit('.', 1)[0]}.rank*")):
                mine.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
            forwards[0] += 1

    model.register_forward_pre_hook(maybe_die, with_kwargs=True)
    return model


def extra_key_tokens(**kwargs):
    train, evaluation, meta = masked_tokens(n_train=16, n_eval=8)
    for s in train.samples:
        s["pixel_values"] = torch.zeros(1)
    return train, evaluation, meta


def unlabelled_tokens(**kwargs):
    train, evaluation, meta = masked_tokens(n_train=16, n_eval=8)
    for s in train.samples + evaluation.samples:
        del s["labels"]
    return train, evaluation, meta


def bad_collate(**kwargs):
    train, evaluation, meta = masked_tokens(n_train=16, n_eval=8)
    return train, evaluation, {**meta, "collate": _to_text}


def ragged_tokens(**kwargs):
    """Samples of different lengths and no collate to pad them."""
    train, evaluation, meta = masked_tokens(n_train=16, n_eval=8)
    for i, s in enumerate(train.samples):
        s.update({k: v[: 8 + i % 3] for k, v in s.items()})
    return train, evaluation, meta


def _to_text(samples):
    return "not a batch"


class HiddenOnly(torch.nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return {"hidden": self.emb(input_ids)}


def hidden_states_only(vocab_size: int, config: dict | None = None):  # config: the shared test file's, unused
    return HiddenOnly(vocab_size)
