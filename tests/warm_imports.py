"""Imported once by the process that tests/forked_ranks.py forks runs from: what each run would
otherwise import again. A library that is missing or fails to import is left to the run itself."""
import importlib

MODULES = ["torch", "torch.distributed", "numpy", "distrain.train", "distrain.trainer", "distrain.checkpoint",
           "distrain.export", "distrain.strategies.replicated", "distrain.strategies.fsdp", "distrain.data",
           "distrain.models", "distrain.weights", "deepspeed", "transformers", "transformers.models.auto.modeling_auto",
           "peft", "safetensors.torch"]

for name in MODULES:
    try:
        importlib.import_module(name)
    except Exception:
        pass
