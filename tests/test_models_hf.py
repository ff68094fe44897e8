"""model.name=hf: transformers' Auto classes from a local directory or inline config keys,
blocks for FSDP2 from _no_split_modules, activation checkpointing, clear errors."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from distrain.config import ConfigError, ModelConfig
from distrain.data.batch import collate
from distrain.models import build_model
from distrain.models.blocks import block_class_names, find_blocks, unknown_class_names
from distrain.models.hf import hf
from tests.hf_tiny import BERT, GPT2, LLAMA, masked_samples

torch.set_num_threads(1)


def test_inline_config_builds_a_causal_lm_for_an_lm_task_with_the_datas_vocabulary():
    config = {k: v for k, v in LLAMA.items() if k != "vocab_size"}
    model = hf(config=config, task="lm", vocab_size=50)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 50
    assert model.config.use_cache is False and all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ConfigError, match="smaller than the data's vocabulary") as e:
        hf(config=LLAMA, task="lm", vocab_size=LLAMA["vocab_size"] + 1)
    assert e.value.key == "model.config.vocab_size"


def test_a_classifier_takes_the_datas_classes_unless_the_config_names_them():
    model = hf(config=BERT, task="classification", num_classes=5)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 5
    assert hf(config={**BERT, "num_labels": 3}, task="classification", num_classes=5).config.num_labels == 3


def test_a_directory_with_only_a_config_builds_fresh_weights_and_with_weights_loads_them(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(**GPT2).save_pretrained(tmp_path / "config_only")
    fresh = hf(path=str(tmp_path / "config_only"), auto_class="AutoModelForCausalLM")
    assert type(fresh).__name__ == "GPT2LMHeadModel" and fresh.lm_head.weight is fresh.transformer.wte.weight
    fresh.save_pretrained(tmp_path / "saved")
    loaded = hf(path=str(tmp_path / "saved"), task="lm")
    assert loaded.training  # from_pretrained's eval mode would train without dropout
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied after loading too
    for (name, a), b in zip(fresh.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_registry_builds_hf_models_from_config_keys():
    model = build_model(ModelConfig(name="hf", args={"config": LLAMA, "auto_class": "AutoModelForCausalLM"}),
                        {"vocab_size": LLAMA["vocab_size"], "seq_len": 16})
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("kwargs,key,match", [
    ({}, "model.path", "needs model.path"),
    ({"path": "/nonexistent/dir"}, "model.path", "holds no config.json"),
    ({"config": {"hidden_size": 8}}, "model.config.model_type", "is required"),
    ({"config": {"model_type": "no_such_arch"}}, "model.config.model_type", "no_such_arch"),
    ({"config": LLAMA, "auto_class": "AutoTokenizer"}, "model.auto_class", "not one of transformers' AutoModel"),
    ({"config": LLAMA, "auto_class": "AutoModelForCausalLMX"}, "model.auto_class", "not one of"),
    ({"config": LLAMA}, "model.auto_class", "name the Auto class"),
    ({"config": LLAMA, "auto_class": "AutoModelForImageClassification"}, "model.auto_class", "cannot build a 'llama'"),
])
def test_mistakes_name_the_key(kwargs, key, match):
    with pytest.raises(ConfigError, match=match) as e:
        hf(**kwargs)
    assert e.value.key == key


def test_without_transformers_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'distrain\[hf\]'") as e:
        hf(config=LLAMA, task="lm")
    assert e.value.key == "model.name"


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    batch = collate(masked_samples(4, 12, seed=5))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = hf(config=LLAMA, task="lm", activation_checkpointing=checkpointing).train()
        model(**batch).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert model.is_activation_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_blocks_come_from_no_split_modules_and_tied_weights_stay_out_of_them():
    llama = hf(config=LLAMA, task="lm")
    assert block_class_names(llama) == {"LlamaDecoderLayer"}
    assert find_blocks(llama, block_class_names(llama)) == list(llama.model.layers)
    gpt2 = hf(config=GPT2, task="lm")
    assert find_blocks(gpt2, block_class_names(gpt2)) == list(gpt2.transformer.h)

    class Head(nn.Module):  # an output head sharing the embedding's weight
        def __init__(self, emb):
            super().__init__()
            self.proj = nn.Linear(4, 10, bias=False)
            self.proj.weight = emb.weight

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(2))
            self.head = Head(self.emb)

    net = Net()
    assert find_blocks(net, ["Sequential", "Head"]) == list(net.blocks)
    assert block_class_names(net) == set()
    assert unknown_class_names(net, ["Sequential", "Blok"]) == ["Blok"]


def test_fsdp_shards_hugging_face_blocks_and_the_named_classes_of_other_models():
    from distrain.strategies.fsdp import shard_units
    from examples.userpkg.vision import torchvision_model

    llama = hf(config=LLAMA, task="lm")
    assert shard_units(llama) == list(llama.model.layers)
    resnet = torchvision_model("resnet18", 10, (1, 8, 8))
    blocks = shard_units(resnet, ["BasicBlock"])
    assert len(blocks) == 8 and all(type(b).__name__ == "BasicBlock" for b in blocks)
    with pytest.raises(ConfigError, match="has no sub-module of class BasikBlock") as e:
        shard_units(resnet, ["BasikBlock"])
    assert e.value.key == "strategy.fsdp_blocks"


def test_under_the_task_loss_a_head_whose_labels_only_feed_its_loss_is_called_without_them():
    from distrain.data.batch import call_model
    from distrain.objectives import build_objective

    T5 = {"model_type": "t5", "vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
          "num_heads": 2, "decoder_start_token_id": 0}
    cases = [(LLAMA, "lm", None, True), (BERT, "classification", None, True), (T5, "lm", "AutoModelForSeq2SeqLM", False)]
    for config, task, auto, expected in cases:
        model = hf(config=config, task=task, num_classes=3, auto_class=auto)
        assert build_objective("task", task, model).without_labels is expected, config["model_type"]
        assert build_objective("model", task, model).without_labels is False  # its own loss needs them
    torch.manual_seed(0)
    model = hf(config=LLAMA, task="lm").eval()
    batch = collate(masked_samples(2, 8, seed=0))
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    bare, full = call_model(model, batch, without_labels=True), call_model(model, batch)
    assert seen == [{"input_ids", "attention_mask"}, {"input_ids", "attention_mask", "labels"}]
    assert bare.loss is None and full.loss is not None and torch.equal(bare.logits, full.logits)
