"""The user package in examples/: token windows, a padding collator in worker processes, a
torchvision model by import path, a loss function returning (sum, count)."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import ROOT, metrics, run_train
from distrain.config import load_config
from distrain.data.batch import check_batch, collate_fn
from examples.userpkg.data import token_file, variable_length_classes, write_byte_tokens
from examples.userpkg.losses import token_cross_entropy
from examples.userpkg.vision import torchvision_model

torch.set_num_threads(1)


def test_token_file_windows_are_dicts_with_labels_equal_to_inputs(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 20)
    assert write_byte_tokens(str(text), str(tmp_path / "t.bin")) == 200
    train, evaluation, meta = token_file(str(tmp_path / "t.bin"), seq_len=16, eval_fraction=0.25)
    assert (len(train), len(evaluation)) == (9, 3) and meta == {"task": "lm", "vocab_size": ord("j") + 1, "seq_len": 16}
    sample = pickle.loads(pickle.dumps(train))[1]  # what a worker process receives
    assert bytes(sample["input_ids"].tolist()) == (b"abcdefghij" * 20)[16:32]
    assert torch.equal(sample["labels"], sample["input_ids"])
    assert bytes(evaluation[0]["input_ids"].tolist()) == (b"abcdefghij" * 20)[144:160]


def test_variable_length_batches_are_padded_in_worker_processes():
    train, _, meta = variable_length_classes(n_train=32, n_eval=8, min_len=3, max_len=9)
    lengths = {len(s["input_ids"]) for s in train.samples}
    assert len(lengths) > 3
    loader = DataLoader(train, batch_size=8, num_workers=2, collate_fn=collate_fn(meta))
    for batch in loader:
        longest = batch["attention_mask"].sum(1).max().item()
        assert batch["input_ids"].shape[1] == longest and batch["labels"].shape == (8,)
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_a_torchvision_model_by_import_path_takes_grey_digits():
    model = torchvision_model("resnet18", num_classes=10, in_shape=(1, 8, 8))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    check_batch(model, (torch.zeros(2, 1, 8, 8), torch.zeros(2)))


def test_the_example_loss_returns_a_sum_and_a_token_count():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 1, 2, 3], [-100, 4, 5, -100, -100]])
    loss_sum, count = token_cross_entropy({"logits": logits}, {"labels": labels})
    assert count.item() == 5
    mean = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(loss_sum / count, mean)


EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("name", ["llama_tokens", "token_loss", "bert_classifier", "torchvision_digits"])
def test_example_configs_load(name):
    cfg = load_config(str(EXAMPLES / f"{name}.yaml"))
    assert cfg.model.name in ("hf", "examples.userpkg.vision:torchvision_model")


def test_the_bert_example_pads_in_worker_processes_under_ddp(tmp_path):
    run = tmp_path / "run"
    run_train(["--config", EXAMPLES / "bert_classifier.yaml", f"run.dir={run}", "train.max_steps=2",
               "train.eval_every=0", "data.n_train=64", "data.n_eval=32"], nproc=2)
    evaluation = metrics(run, "eval")[-1]
    assert evaluation["samples"] == 32 and 0 <= evaluation["accuracy"] <= 1


def test_the_token_file_and_torchvision_examples_run(tmp_path):
    tokens = tmp_path / "readme.tokens"
    write_byte_tokens(str(ROOT / "README.md"), str(tokens))
    run_train(["--config", EXAMPLES / "llama_tokens.yaml", f"run.dir={tmp_path / 'llama'}", f"data.path={tokens}",
               "train.max_steps=2", "train.eval_every=0", "data.eval_fraction=0.01", "strategy.name=single"])
    assert "perplexity" in metrics(tmp_path / "llama", "eval")[-1]
    run_train(["--config", EXAMPLES / "torchvision_digits.yaml", f"run.dir={tmp_path / 'resnet'}",
               "train.max_steps=2", "train.eval_every=0", "data.global_batch_size=16"], nproc=2)
    assert metrics(tmp_path / "resnet", "eval")[-1]["samples"] == 360
