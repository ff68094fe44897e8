"""Weights in and out (distrain.weights) against the libraries' own calls, on a ~100M-parameter
Llama-style model (float32, ~400 MB), saved sharded with save_pretrained.

    python bench/weights.py export [--rounds 5]   # save_safetensors vs safetensors.torch.save_file
    python bench/weights.py load [--rounds 3]     # init_from on one process vs from_pretrained
    python bench/weights.py fsdp                  # 2 gloo ranks: peak RSS raised by build + load, per rank
    python bench/weights.py zero3                 # the same under DeepSpeed ZeRO-3's partitioning

Method: export alternates the two writers (A B A B ...) on the same state into the same
directory, medians with min-max. load starts one fresh process per measurement, alternating,
each reporting its wall time for build + load and its peak RSS (ru_maxrss), imports included.
fsdp resets the kernel's peak-RSS mark (/proc/self/clear_refs) after the imports, then builds,
shards with fully_shard and loads, one torchrun each way: `meta` is distrain's fsdp path
(parameters built on the meta device, each rank allocates its shards and reads its slices),
`built` the model built whole with random weights on every rank before sharding and reading
the slices, `naive` that build then every rank reading the whole file (set_model_state_dict);
the raise of each rank's peak RSS is compared with its shard + the largest tensor. zero3 does
the same with DeepSpeed's partitioning (zero.Init on the built module): `meta` is distrain's
ZeRO-3 path (one module's parameters allocated and read whole at a time, then partitioned),
`built` the model built and loaded whole on every rank, then partitioned.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "llama", "vocab_size": 8000, "hidden_size": 768, "intermediate_size": 2048,
          "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
          "max_position_embeddings": 256, "tie_word_embeddings": False}


def build(path: str | None = None):
    """The model with fresh weights, from CONFIG or a saved directory's config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path) if path else AutoConfig.for_model(**CONFIG)
    return AutoModelForCausalLM.from_config(config)


def saved_model(directory: Path) -> Path:
    path = directory / "llama100m"
    if not (path / "model.safetensors.index.json").is_file():
        build().save_pretrained(path, max_shard_size="100MB")
    return path


def spread(values) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def bench_export(rounds: int, directory: Path) -> dict:
    from safetensors.torch import save_file

    from distrain.export import save_safetensors

    state = {k: v.contiguous() for k, v in build().state_dict().items()}
    times = {"distrain": [], "save_file": []}
    for _ in range(rounds):
        for name, write in (("distrain", lambda p: save_safetensors(state, p)),
                            ("save_file", lambda p: save_file(state, str(p), metadata={"format": "pt"}))):
            out = directory / f"{name}.safetensors"
            start = time.perf_counter()
            write(out)
            times[name].append(time.perf_counter() - start)
            out.unlink()
    ratio = [b / a for a, b in zip(times["distrain"], times["save_file"])]
    size = sum(v.numel() * v.element_size() for v in state.values())
    print(f"export {size / 2**20:.0f} MiB: distrain {spread(times['distrain'])} s, save_file "
          f"{spread(times['save_file'])} s; speed ratio distrain/save_file {spread(ratio)}")
    return {"bytes": size, **times, "ratio": ratio}


def load_child(how: str, path: str) -> None:
    start = time.perf_counter()
    if how == "distrain":  # its path for a model the files fill: built on meta, allocated, then read
        from distrain.models.empty import materialize, parameters_on_meta
        from distrain.weights import load_planned, plan_init

        with parameters_on_meta():
            model = build(path)
        materialize(model, torch.device("cpu"))
        load_planned(model, *plan_init(model, path))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    print(json.dumps({"s": time.perf_counter() - start, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_load(rounds: int, directory: Path) -> dict:
    path = saved_model(directory)
    out = {"distrain": [], "from_pretrained": []}
    for _ in range(rounds):
        for how in out:
            proc = subprocess.run([sys.executable, __file__, "load-child", how, str(path)], capture_output=True,
                                  text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
            out[how].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for how, rows in out.items():
        print(f"load {how}: {spread([r['s'] for r in rows])} s, peak RSS {spread([r['peak_mib'] for r in rows])} MiB")
    return out


def fsdp_worker(how: str, path: str) -> None:
    """One rank: the peak RSS raised by build + shard + load, over the RSS after the imports."""
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401 - before the mark: the build is measured
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from distrain.models.empty import materialize, parameters_on_meta
    from distrain.weights import load_planned, plan_init

    dist.init_process_group("gloo")
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark starts again from the current RSS
    before = _status("VmRSS")
    if how == "meta":  # distrain's fsdp path: parameters on meta, each rank allocates and reads its shards
        with parameters_on_meta():
            model = build(path)
    else:
        model = build(path)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if how == "meta":
        materialize(model, torch.device("cpu"))
    if how in ("meta", "built"):
        load_planned(model, *plan_init(model, path))
    else:
        from safetensors.torch import load_file

        full = {}
        for file in sorted(Path(path).glob("model-*.safetensors")):
            full.update(load_file(str(file)))
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    raised = _status("VmHWM") - before
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    row = {"rank": dist.get_rank(), "how": how, "raised_mib": raised / 2**20, "shard_mib": shard / 2**20,
           "largest_mib": largest / 2**20}
    (Path(path).parent / f"fsdp-{how}-rank{dist.get_rank()}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def zero3_worker(how: str, path: str) -> None:
    """One rank: the peak RSS raised by build + load + ZeRO-3 partitioning, over the RSS after the imports."""
    import deepspeed
    import transformers.models.llama.modeling_llama  # noqa: F401 - before the mark: the build is measured

    from distrain.models.empty import parameters_on_meta
    from distrain.strategies.deepspeed import partition_from_files
    from distrain.weights import InitWeights, load_planned, plan_init

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = {"train_batch_size": 2, "zero_optimization": {"stage": 3}}
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    if how == "meta":  # distrain's ZeRO-3 path: one module's parameters whole at a time, then partitioned
        with parameters_on_meta():
            model = build(path)
        partition_from_files(model, InitWeights(*plan_init(model, path)), config, torch.device("cpu"), None)
    else:  # built and loaded whole on every rank, then partitioned, as the engine does with such a model
        model = build(path)
        load_planned(model, *plan_init(model, path))
        deepspeed.zero.Init(module=model, config_dict_or_path=config, mem_efficient_linear=False)
    raised = _status("VmHWM") - before
    shard = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    largest = max(p.ds_numel * p.ds_tensor.element_size() for p in model.parameters())
    rank = torch.distributed.get_rank()
    row = {"rank": rank, "how": how, "raised_mib": raised / 2**20, "shard_mib": shard / 2**20,
           "largest_mib": largest / 2**20}
    (Path(path).parent / f"zero3-{how}-rank{rank}.json").write_text(json.dumps(row))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def bench_sharded(kind: str, hows: tuple, directory: Path) -> list:
    path = saved_model(directory)
    rows = []
    for how in hows:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, f"{kind}-worker", how, str(path)], capture_output=True, text=True, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        for rank in (0, 1):
            row = json.loads((path.parent / f"{kind}-{how}-rank{rank}.json").read_text())
            row["bound_mib"] = 1.1 * (row["shard_mib"] + row["largest_mib"])
            rows.append(row)
            print(f"{kind} {how} rank {rank}: peak RSS raised {row['raised_mib']:.0f} MiB; shard "
                  f"{row['shard_mib']:.0f} MiB + largest tensor {row['largest_mib']:.0f} MiB, +10% = "
                  f"{row['bound_mib']:.0f} MiB")
    return rows


def main() -> None:
    if sys.argv[1] == "load-child":
        return load_child(sys.argv[2], sys.argv[3])
    if sys.argv[1].endswith("-worker"):
        return {"fsdp-worker": fsdp_worker, "zero3-worker": zero3_worker}[sys.argv[1]](sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("what", choices=("export", "load", "fsdp", "zero3"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", type=Path, default=None, help="where the model files go (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        {"export": lambda: bench_export(args.rounds, directory), "load": lambda: bench_load(args.rounds, directory),
         "fsdp": lambda: bench_sharded("fsdp", ("meta", "built", "naive"), directory),
         "zero3": lambda: bench_sharded("zero3", ("meta", "built"), directory)}[args.what]()


if __name__ == "__main__":
    main()
