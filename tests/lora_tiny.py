"""A user model builder that applies LoRA itself with peft (`model.name=tests.lora_tiny:peft_llama`),
as a user package would, instead of through model.lora."""
from __future__ import annotations


def peft_llama(config: dict, task: str | None = None, vocab_size: int | None = None, r: int = 8):
    from peft import LoraConfig, get_peft_model

    from distrain.models.hf import hf

    return get_peft_model(hf(config=config, task=task, vocab_size=vocab_size),
                          LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj"]))
