"""Checkpoint protocol, fallback, safety, config checks, retention and export (single process: fast)."""
import zipfile

import pytest
import torch

from conftest import CONFIGS, final_weights, train_inprocess

BASE = ["--config", CONFIGS / "digits_mlp.yaml", "strategy.name=single", "train.epochs=null", "train.log_every=5",
        "checkpoint.every_steps=5", "checkpoint.keep_last=10", "model.hidden=[16]"]


def train(run, *extra):
    return train_inprocess([*BASE, f"run.dir={run}", *extra])


def test_checkpoint_layout_and_latest(tmp_path):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=12") == 0
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000005", "step_00000010", "step_00000012"]
    assert (ckpts / "latest").read_text() == "step_00000012\n"
    step = ckpts / "step_00000012"
    assert {p.name for p in step.iterdir()} == {"model.pt", "trainer.pt", "rng", "manifest.json"}
    meta = torch.load(step / "trainer.pt", weights_only=True)
    assert meta["trainer"]["step"] == 12 and meta["trainer"]["data"] == {"epoch": 0, "position": 12 * 64}
    assert meta["config"]["optim"]["lr"] == 0.003 and meta["world_size"] == 1


def test_keep_last_never_deletes_what_latest_names(tmp_path):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=22", "checkpoint.keep_last=2") == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_00000020", "step_00000022"]
    # a checkpoint retired by a process killed before it finished deleting it: never loaded, removed later
    leftover = run / "checkpoints" / ".retired-step_00000099"
    leftover.mkdir()
    (leftover / "trainer.pt").write_bytes(b"garbage")
    assert train(run, "train.max_steps=30", "checkpoint.keep_last=2") == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_00000025", "step_00000030"]


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=15") == 0
    reference = tmp_path / "ref"
    assert train(reference, "train.max_steps=20") == 0
    newest = run / "checkpoints" / "step_00000015" / "model.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    assert train(run, "train.max_steps=20") == 0
    out = "".join(capsys.readouterr())
    assert f"checkpoint {newest.parent} is unreadable" in out and "model.pt has 1000 bytes" in out
    assert "resumed from" in out and "step_00000010 at step 10" in out
    ours, ref = final_weights(run), final_weights(reference)
    assert all(ours[k].equal(ref[k]) for k in ref)


def test_corrupt_bytes_of_the_same_size_fall_back(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=10") == 0
    newest = run / "checkpoints" / "step_00000010" / "model.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside the tensor payload
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert train(run, "train.max_steps=12") == 0
    out = "".join(capsys.readouterr())
    assert "step_00000010 is unreadable" in out and "step_00000005 at step 5" in out


def test_a_pickled_object_payload_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=5") == 0
    trainer_pt = run / "checkpoints" / "step_00000005" / "trainer.pt"
    meta = torch.load(trainer_pt, weights_only=True)
    meta["payload"] = Exploit()
    torch.save(meta, trainer_pt)
    from distrain.checkpoint import write_manifest

    write_manifest(trainer_pt.parent)
    capsys.readouterr()
    assert train(run, "train.max_steps=8") == 2
    err = capsys.readouterr().err
    assert "needs arbitrary unpickling" in err and "io.open" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


class Exploit:
    def __reduce__(self):
        return (open, ("pwned", "w"))


def test_a_never_committed_directory_is_never_loaded(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=10") == 0
    ckpts = run / "checkpoints"
    (ckpts / "step_00000010").rename(ckpts / ".tmp-step_00000010")  # as if killed before the commit
    (ckpts / "latest").write_text("step_00000005\n")
    capsys.readouterr()
    assert train(run, "train.max_steps=12") == 0
    assert "step_00000005 at step 5" in "".join(capsys.readouterr())


def test_optimization_changes_are_refused_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=5") == 0
    capsys.readouterr()
    saved = (run / "config.yaml").read_text()
    assert train(run, "train.max_steps=8", "optim.lr=0.1", "data.global_batch_size=32") == 2
    err = capsys.readouterr().err
    assert "'optim.lr'" in err and "data.global_batch_size" in err and "allow_config_change" in err
    assert (run / "config.yaml").read_text() == saved  # the refused config did not replace the run's own
    assert train(run, "train.max_steps=8", "model.hidden=[16,16]") == 2  # another model is not this run's
    assert "'model.hidden'" in capsys.readouterr().err
    # the micro batch (and the world size) may change freely; the override key accepts the rest
    assert train(run, "train.max_steps=8", "data.micro_batch_size=16") == 0
    assert train(run, "train.max_steps=10", "optim.lr=0.1", "checkpoint.allow_config_change=true") == 0


def test_resume_never_refuses_to_overwrite_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=5") == 0
    capsys.readouterr()
    assert train(run, "train.max_steps=5", "checkpoint.resume=never") == 2
    assert "run.overwrite=true" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000005").exists()  # nothing already saved is lost
    assert train(run, "train.max_steps=3", "checkpoint.resume=never", "run.overwrite=true") == 0
    assert not (run / "checkpoints" / "step_00000005").exists()


def test_resume_from_an_explicit_path(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert train(run, "train.max_steps=10") == 0
    capsys.readouterr()
    assert train(other, "train.max_steps=12", f"checkpoint.resume={run / 'checkpoints' / 'step_00000005'}") == 0
    assert "at step 5" in capsys.readouterr().out


def test_export_command_for_a_full_checkpoint(tmp_path):
    from distrain.cli import main

    run = tmp_path / "run"
    assert train(run, "train.max_steps=6") == 0
    assert main(["export", str(run), str(tmp_path / "out.pt")]) == 0
    exported, final = torch.load(tmp_path / "out.pt", weights_only=True), final_weights(run)
    assert all(exported[k].equal(final[k]) for k in final)
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 2


def test_checkpoint_files_hold_only_plain_data(tmp_path):
    run = tmp_path / "run"
    assert train(run, "train.max_steps=5") == 0
    for f in (run / "checkpoints" / "step_00000005").rglob("*.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == [], f
        with zipfile.ZipFile(f) as z:
            pickle_bytes = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        assert b"distrain" not in pickle_bytes


def test_weights_check_tells_huge_finite_weights_from_non_finite_ones():
    from distrain.checkpoint import weights_finite

    layer = torch.nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight.fill_(3e38)  # its float32 norm would overflow
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert weights_finite(layer, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())  # the check changes no value
    with torch.no_grad():
        layer.bias[3] = float("nan")
    assert not weights_finite(layer, torch.device("cpu"))


def test_crc_check_finds_the_record_with_a_flipped_byte_and_truncation(tmp_path):
    import zlib

    from distrain.checkpoint_io import crc32, verify_crc

    payload = torch.arange(300_000, dtype=torch.float32)
    assert crc32(payload.numpy().tobytes()) == zlib.crc32(payload.numpy().tobytes())
    torch.save({"a": payload, "b": torch.ones(10)}, tmp_path / "model.pt")
    assert verify_crc(tmp_path) is None
    data = bytearray((tmp_path / "model.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "model.pt") as z:
        record = max(z.infolist(), key=lambda i: i.file_size)  # the 1.2 MB tensor
        assert record.compress_type == zipfile.ZIP_STORED
    at = data.index(payload[1000:1004].numpy().tobytes())
    data[at] ^= 0x01
    (tmp_path / "model.pt").write_bytes(bytes(data))
    assert verify_crc(tmp_path) == f"model.pt: record {record.filename} fails its CRC check"
    with zipfile.ZipFile(tmp_path / "model.pt") as z:
        assert z.testzip() == record.filename  # the standard library agrees
    (tmp_path / "model.pt").write_bytes(bytes(data[: len(data) // 2]))
    assert verify_crc(tmp_path).startswith("model.pt: ")


def test_loaded_state_does_not_live_in_the_mapped_file(tmp_path):
    from distrain.strategies.common import load_full, save_full

    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    save_full(tmp_path, model, opt, None)
    fresh = torch.nn.Linear(32, 8)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    load_full(tmp_path, fresh, fresh_opt, None, torch.device("cpu"))
    weights = {k: v.clone() for k, v in fresh.state_dict().items()}
    moments = [s["exp_avg_sq"].clone() for s in fresh_opt.state.values()]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, s["exp_avg_sq"]) for a, s in zip(moments, opt.state.values()))
    with open(tmp_path / "model.pt", "r+b") as f:  # scribble over the file in place, pages and all
        size = f.seek(0, 2)
        f.seek(0)
        f.write(b"\x7f" * size)
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())
    assert all(torch.equal(a, s["exp_avg_sq"]) for a, s in zip(moments, fresh_opt.state.values()))


def test_a_loaded_model_keeps_its_parameter_objects_and_ties(tmp_path):
    from distrain.strategies.common import load_full, save_full

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("count", torch.zeros(()))

    torch.manual_seed(0)
    model, fresh = Tied(), Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.count += 3
    save_full(tmp_path, model, opt, None)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    weight = fresh.emb.weight
    load_full(tmp_path, fresh, fresh_opt, None, torch.device("cpu"))
    assert fresh.emb.weight is weight and fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight) and fresh.count.item() == 3
    fresh.head(fresh.emb(torch.tensor([1, 2]))).sum().backward()
    fresh_opt.step()  # the optimizer updates the module's own (loaded) parameter
    assert not torch.equal(fresh.emb.weight, model.emb.weight)


def test_only_files_deepspeed_unpickles_itself_are_vetted(tmp_path):
    from distrain.checkpoint_io import UnsafeCheckpointError, safe_load, vet_files

    torch.save({"x": Exploit()}, tmp_path / "model.pt")
    vet_files(tmp_path)  # distrain's own files are refused by the loader itself
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        safe_load(tmp_path / "model.pt")
    (tmp_path / "deepspeed").mkdir()
    torch.save({"x": Exploit()}, tmp_path / "deepspeed" / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        vet_files(tmp_path)
    assert not (tmp_path / "pwned").exists()
