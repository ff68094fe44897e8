"""distrain.data.batch: tuple and dict batches, moved, called, counted, collated and checked."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distrain.config import ConfigError
from distrain.data import batch as B


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return {"logits": self.emb(input_ids), "mask": attention_mask}


def test_to_device_moves_tensors_and_leaves_other_values():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "ids": ["a", "b"], "n": 3, "nested": (torch.zeros(1),)}
    moved = B.to_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["nested"][0].device.type == "meta"
    assert moved["ids"] == ["a", "b"] and moved["n"] == 3
    x, y = B.to_device((torch.zeros(2), torch.ones(2)), torch.device("meta"))
    assert x.device.type == y.device.type == "meta"


def test_call_model_unpacks_dicts_and_passes_the_input_of_tuples():
    model = DictModel()
    ids = torch.tensor([[1, 2]])
    out = B.call_model(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert out["logits"].shape == (1, 2, 4) and out["mask"] is not None
    assert B.call_model(nn.Identity(), (ids, torch.zeros(1))) is ids


def test_count_items_counts_labels_not_ignored_with_the_causal_shift():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 1, 2, 3]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    assert B.count_items(batch, shifted=False).item() == 5
    labels[:, 0] = 7  # the first label of a row has no prediction before it: not counted when shifted
    assert B.count_items(batch, shifted=True).item() == 5
    assert B.count_items(batch, shifted=False).item() == 7
    assert B.count_items((torch.zeros(3, 2), torch.tensor([1, 2, -100])), shifted=False).item() == 2  # tuple classes
    assert B.count_items({"pixel_values": torch.zeros(5, 3)}, shifted=False).item() == 5  # no labels: samples
    assert B.count_items({"x": torch.zeros(2), "labels": torch.zeros(2, 3)}, shifted=False).item() == 6  # float targets


def test_collate_defaults_to_stacking_and_uses_the_data_builders_collate():
    samples = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor(0)}] * 3
    batch = B.collate(samples, B.collate_fn({}))
    assert batch["input_ids"].shape == (3, 2) and batch["labels"].shape == (3,)
    x, y = B.collate([(torch.zeros(2), torch.tensor(1))] * 2, B.collate_fn({}))
    assert x.shape == (2, 2) and y.tolist() == [1, 1]
    custom = B.collate_fn({"collate": lambda s: {"input_ids": torch.zeros(len(s), 9)}})
    assert B.collate(samples, custom)["input_ids"].shape == (3, 9)
    with pytest.raises(ConfigError, match="meta\\['collate'\\] must be a callable"):
        B.collate_fn({"collate": 3})


@pytest.mark.parametrize("bad,found", [({"ids": [1, 2]}, "no tensor"), ([1, 2], "a list of int, int"),
                                       ("text", "a str"), (None, "a NoneType")])
def test_an_unusable_batch_names_what_was_found(bad, found):
    with pytest.raises(ConfigError, match=found) as e:
        B.collate([0], lambda samples: bad)
    assert e.value.key == "data.name"


def test_check_batch_names_a_key_forward_does_not_take_and_the_model_class():
    model = DictModel()
    B.check_batch(model, {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, 2)})
    with pytest.raises(ConfigError, match="batch key 'pixel_values' is not an argument of DictModel.forward"):
        B.check_batch(model, {"input_ids": torch.zeros(1), "pixel_values": torch.zeros(1)})


def test_check_batch_accepts_any_key_for_plain_kwargs_and_the_declared_ones_for_hugging_face():
    class Open(nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    B.check_batch(Open(), {"input_ids": torch.zeros(1), "whatever": torch.zeros(1)})
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.hf_tiny import LLAMA

    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}))
    B.check_batch(llama, {"input_ids": torch.zeros(1), "labels": torch.zeros(1), "num_items_in_batch": 3})
    with pytest.raises(ConfigError, match="batch key 'token_type_ids' is not an argument of LlamaForCausalLM"):
        B.check_batch(llama, {"input_ids": torch.zeros(1), "token_type_ids": torch.zeros(1)})


def test_the_model_class_is_named_as_written_also_under_fsdp2s_subclass():
    fsdp_subclass = type("FSDPDictModel", (DictModel,), {})  # what fully_shard swaps in
    assert B.model_class_name(fsdp_subclass()) == "DictModel" == B.model_class_name(DictModel())
