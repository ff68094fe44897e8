"""distrain.weights: reading a Hugging Face directory (sharded), a .safetensors file or a .pt
state_dict into a model, key matching with clear errors, and writing safetensors with tied
weights once."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from distrain.config import ConfigError
from distrain.export import save_safetensors
from distrain.weights import WeightFiles, load_planned, plan_init
from tests.hf_tiny import GPT2, LLAMA

torch.set_num_threads(1)


def tiny(config: dict, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


def load(model, path, strict=True):
    load_planned(model, *plan_init(model, path, strict))
    return model


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama in save_pretrained's layout, sharded into several safetensors files."""
    path = tmp_path_factory.mktemp("llama") / "hf"
    model = tiny(LLAMA, seed=1)
    model.save_pretrained(path, max_shard_size="100KB")
    return model, path


def test_a_sharded_hf_directory_loads_every_tensor(saved_llama):
    source, path = saved_llama
    assert len(list(path.glob("model-*.safetensors"))) >= 2 and (path / "model.safetensors.index.json").is_file()
    target = tiny(LLAMA, seed=2)
    assert not torch.equal(target.lm_head.weight, source.lm_head.weight)
    assert_same_state(load(target, path), source)
    assert_same_state(load(tiny(LLAMA, seed=3), path / "model.safetensors.index.json"), source)


def test_a_safetensors_file_and_a_pt_state_dict_load(saved_llama, tmp_path):
    source, _ = saved_llama
    save_safetensors(source.state_dict(), tmp_path / "w.safetensors")
    torch.save(source.state_dict(), tmp_path / "w.pt")
    assert_same_state(load(tiny(LLAMA, seed=2), tmp_path / "w.safetensors"), source)
    assert_same_state(load(tiny(LLAMA, seed=2), tmp_path / "w.pt"), source)


def test_slices_read_only_the_asked_part(saved_llama):
    source, path = saved_llama
    files = WeightFiles(path)
    name = "model.embed_tokens.weight"
    assert files.shape(name) == tuple(source.get_parameter(name).shape)
    assert torch.equal(files.read(name, (slice(5, 9), slice(None))), source.get_parameter(name)[5:9].detach())


def test_reads_go_straight_into_a_tensor_where_the_file_holds_its_bytes(saved_llama):
    source, path = saved_llama
    files, name = WeightFiles(path), "model.embed_tokens.weight"
    full = source.get_parameter(name).detach()
    rows, cols = (slice(5, 9), slice(0, full.shape[1])), (slice(0, full.shape[0]), slice(2, 6))
    cases = [(None, full.shape, torch.float32, True), (rows, (4, full.shape[1]), torch.float32, True),
             (cols, (full.shape[0], 4), torch.float32, False), (None, full.shape, torch.bfloat16, False),
             (rows, (3, full.shape[1]), torch.float32, False)]  # a shape that does not match: copy_ raises
    for index, shape, dtype, straight in cases:
        out = torch.empty(shape, dtype=dtype)
        assert (files._span(out, name, index) is not None) == straight, (index, dtype)
        if shape[0] == 3:
            with pytest.raises(RuntimeError):
                files.read_into(out, name, index)
            continue
        files.read_into(out, name, index)
        assert torch.equal(out, (full if index is None else full[index]).to(dtype))
    fds = list(files.fds.values())
    files.close()  # what a load does when it is done: no descriptor kept for the rest of the run
    assert fds and not files.fds and not any(os.path.exists(f"/proc/self/fd/{fd}") for fd in fds)
    out = torch.empty(full.shape)
    files.read_into(out, name)  # opens again
    assert torch.equal(out, full)


def test_weights_are_cast_to_the_models_dtype(saved_llama):
    source, path = saved_llama
    target = load(tiny(LLAMA, seed=2).to(torch.bfloat16), path)
    assert target.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(target.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))


def test_tied_weights_are_written_once_and_tied_on_load(tmp_path):
    from safetensors import safe_open

    source = tiny(GPT2, seed=1)
    assert source.lm_head.weight is source.transformer.wte.weight
    save_safetensors(source.state_dict(), tmp_path / "gpt2.safetensors")
    with safe_open(str(tmp_path / "gpt2.safetensors"), "pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) != ("transformer.wte.weight" in names)
    target = load(tiny(GPT2, seed=2), tmp_path / "gpt2.safetensors")
    assert target.lm_head.weight is target.transformer.wte.weight
    assert_same_state(target, source)


def test_a_key_mismatch_names_the_first_keys_unless_strict_is_off(saved_llama, tmp_path):
    source, _ = saved_llama
    state = source.state_dict()
    state["extra.weight"] = torch.zeros(2)
    for i in range(2):
        del state[f"model.layers.{i}.mlp.up_proj.weight"]
    del state["model.norm.weight"]
    del state["lm_head.weight"]
    save_safetensors(state, tmp_path / "partial.safetensors")
    target = tiny(LLAMA, seed=2)
    with pytest.raises(ConfigError, match=r"missing model\.layers\.0\.mlp\.up_proj\.weight, .* \(\+1 more\); "
                                          r"unexpected extra\.weight .*init_strict=false") as e:
        plan_init(target, tmp_path / "partial.safetensors")
    assert e.value.key == "model.init_from" and "\n" not in str(e.value)
    before = target.lm_head.weight.detach().clone()
    load(target, tmp_path / "partial.safetensors", strict=False)
    assert torch.equal(target.lm_head.weight, before)  # not in the file: as built
    assert torch.equal(target.model.embed_tokens.weight, source.model.embed_tokens.weight)


def test_a_shape_mismatch_is_an_error_even_when_not_strict(saved_llama):
    _, path = saved_llama
    with pytest.raises(ConfigError, match=r"model\.embed_tokens\.weight has shape \[64, 64\]"):
        plan_init(tiny({**LLAMA, "vocab_size": 80}, seed=0), path, strict=False)


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "absent.safetensors", "no weights at"),
    (lambda d: d, "holds no model.safetensors"),
    (lambda d: _write(d / "bad.safetensors", b"\xff" * 64), "bad.safetensors is not a readable safetensors file"),
    (lambda d: _write(d / "bad.pt", b"not a zip"), "bad.pt is not a readable state_dict"),
    (lambda d: _write(d / "model.safetensors.index.json", b'{"weight_map": {"a": "gone.safetensors"}}'),
     "lists gone.safetensors"),
])
def test_unreadable_weights_are_one_line_config_errors(tmp_path, make, match):
    with pytest.raises(ConfigError, match=match) as e:
        WeightFiles(make(tmp_path))
    assert e.value.key == "model.init_from" and "\n" not in str(e.value)


def test_a_truncated_safetensors_header_names_the_file(saved_llama, tmp_path):
    source, _ = saved_llama
    good = save_safetensors(source.state_dict(), tmp_path / "w.safetensors").read_bytes()
    _write(tmp_path / "cut.safetensors", good[:8] + good[8:40])  # the header's length says more than is there
    with pytest.raises(ConfigError, match="cut.safetensors is not a readable safetensors file"):
        WeightFiles(tmp_path / "cut.safetensors")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


class FakeMesh:
    def __init__(self, shape, coordinate):
        self.shape, self.coordinate = shape, coordinate

    def get_coordinate(self):
        return list(self.coordinate)

    def size(self, dim=None):
        return self.shape[dim]


class FakeShard:
    """What local_index reads of a DTensor, with the local shape and offset of torch's own (private,
    plain-data) rule, for any mesh shape without a process group."""

    def __init__(self, shape, mesh, placements):
        from torch.distributed.tensor import _utils

        self.shape, self.device_mesh, self.placements = torch.Size(shape), mesh, placements
        self.expected = _utils._compute_local_shape_and_global_offset(self.shape, mesh.shape, list(mesh.coordinate),
                                                                      placements, False)

    def to_local(self):
        return torch.empty(self.expected[0])


@pytest.mark.parametrize("shape, mesh, placements", [
    ((129, 64), (2,), "S0"), ((5, 3), (4,), "S0"), ((2, 3), (4,), "S0"), ((9, 7), (2, 3), "RS0"),
    ((9, 7), (2, 3), "S0S0"), ((9, 7), (2, 2), "S0S1"),
])
def test_local_index_is_the_slice_torch_assigns_each_rank(shape, mesh, placements):
    from itertools import product

    from torch.distributed.tensor import Replicate, Shard

    from distrain.weights import local_index

    kinds = [Replicate() if p == "R" else Shard(int(d)) for p, d in
             [(placements[i], placements[i + 1] if placements[i] == "S" else "0")
              for i in range(len(placements)) if placements[i] in "RS"]]
    for coordinate in product(*map(range, mesh)):
        fake = FakeShard(shape, FakeMesh(mesh, coordinate), kinds)
        local_shape, offset = fake.expected
        assert local_index(fake) == tuple(slice(o, o + s) for o, s in zip(offset, local_shape)), coordinate


def test_an_empty_build_has_meta_parameters_real_buffers_and_ties():
    from distrain.config import ModelConfig
    from distrain.models import build_model

    def build(config, empty):
        torch.manual_seed(0)
        return build_model(ModelConfig(name="hf", args={"config": config}), {"task": "lm"}, empty=empty)

    empty, real = build(LLAMA, True), build(LLAMA, False)
    assert all(p.is_meta for p in empty.parameters())
    buffers = dict(real.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers())  # rotary frequencies
    gpt2 = build(GPT2, True)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight and gpt2.lm_head.weight.is_meta


def test_a_sharded_load_builds_on_meta_only_when_the_files_fill_every_parameter(saved_llama, tmp_path):
    """build_for_run's choice, and the weights of the real build it falls back to: those of a plain
    build from the same random state, whatever the meta build before it drew."""
    from types import SimpleNamespace

    from distrain.config import ModelConfig
    from distrain.models import build_model
    from distrain.models.empty import build_for_run

    source, path = saved_llama
    partial = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    save_safetensors(partial, tmp_path / "partial.safetensors")
    fresh, resumed = SimpleNamespace(resume="never"), SimpleNamespace(resume="auto")
    (tmp_path / "ckpt" / "step_00000002").mkdir(parents=True)

    def run(model: ModelConfig, checkpoint=fresh, sharded=True):
        torch.manual_seed(5)
        return build_for_run(lambda empty: build_model(model, {"task": "lm"}, empty=empty), model, checkpoint,
                             tmp_path / "ckpt", sharded)

    plain = run(ModelConfig(name="hf", args={"config": LLAMA}), sharded=False)[0]
    cases = [  # (model section, checkpoint section, sharded) -> built on meta
        ((ModelConfig(name="hf", init_from=str(path), args={"config": LLAMA}), fresh, True), True),
        ((ModelConfig(name="hf", init_from=str(path), args={"config": LLAMA}), fresh, False), False),
        ((ModelConfig(name="hf", init_from=str(path), args={"config": LLAMA}), resumed, True), False),
        ((ModelConfig(name="hf", init_from=str(tmp_path / "partial.safetensors"), init_strict=False,
                      args={"config": LLAMA}), fresh, True), False),
        ((ModelConfig(name="hf", args={"path": str(path)}), fresh, True), True),  # the directory's own weights
        ((ModelConfig(name="hf", init_from=str(path), args={"config": LLAMA},
                      lora={"r": 4, "target_modules": ["q_proj"]}), resumed, True), True),  # frozen base: always
        ((ModelConfig(name="tests.lora_tiny:peft_llama", init_from=str(path), args={"config": LLAMA}), fresh, True),
         False),  # adapters its builder made: nothing would initialise them
    ]
    for (model, checkpoint, sharded), on_meta in cases:
        module, init = run(model, checkpoint, sharded)
        assert any(p.is_meta for p in module.parameters()) == on_meta, model
        assert (init is not None) == (checkpoint is fresh or model.lora is not None), model
        if model.init_strict is False:  # a plain build's weights, then the file's tensors over it
            assert torch.equal(module.lm_head.weight, plain.lm_head.weight)
            init.load(module)
            assert torch.equal(module.lm_head.weight, plain.lm_head.weight)
            assert torch.equal(module.model.embed_tokens.weight, source.model.embed_tokens.weight)
            assert not torch.equal(plain.model.embed_tokens.weight, source.model.embed_tokens.weight)


def test_lora_adapters_start_the_same_on_a_meta_base_and_a_real_one():
    from distrain.config import ModelConfig
    from distrain.models import build_model

    def adapters(empty):
        torch.manual_seed(3)
        model = build_model(ModelConfig(name="hf", lora={"r": 4, "target_modules": ["q_proj", "embed_tokens"]},
                                        args={"config": LLAMA}), {"task": "lm"}, empty=empty)
        return {n: p for n, p in model.named_parameters() if "lora_" in n}

    on_meta, real = adapters(True), adapters(False)
    assert on_meta.keys() == real.keys() and len(on_meta) == 6  # A and B: the embedding, q in 2 layers
    assert all(not p.is_meta and torch.equal(p, real[n]) for n, p in on_meta.items())
    assert all(not p.any() for n, p in real.items() if "lora_B" in n)  # peft's init: B zero
    assert all(p.std() > 0 for n, p in real.items() if "lora_A.default" in n)
