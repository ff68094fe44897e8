"""The same reference loop through the libraries users would pick instead of distrain:
Lightning Fabric and Hugging Face Accelerate (the `bench` extra installs both). Each runs
its documented minimal pattern: wrap model and optimizer, call its backward. Imports stay
inside the functions, so that timing a library's import measures that library alone."""
from __future__ import annotations

import importlib.util


def fabric(model_name: str, steps: int, batch: int, ddp: bool = False, **kw):
    import lightning as L
    import torch

    from bench.common import reference_loop

    runner = L.Fabric(accelerator="cpu", devices=torch.distributed.get_world_size() if ddp else 1,
                      strategy="ddp" if ddp else "auto", precision="32-true")
    runner.launch()  # under torchrun: joins the existing process group, spawns nothing

    def prepare(model, opt):
        net, opt = runner.setup(model, opt)
        return net, opt, runner.backward

    return reference_loop(model_name, steps, batch, prepare, ddp=ddp, **kw)


def accelerate(model_name: str, steps: int, batch: int, ddp: bool = False, **kw):
    from accelerate import Accelerator

    from bench.common import reference_loop

    runner = Accelerator(cpu=True)

    def prepare(model, opt):
        net, opt = runner.prepare(model, opt)
        return net, opt, runner.backward

    return reference_loop(model_name, steps, batch, prepare, ddp=ddp, **kw)


def hand(model_name: str, steps: int, batch: int, ddp: bool = False, **kw):
    from bench.common import hand_written

    return hand_written(model_name, steps, batch, ddp=ddp, **kw)


def distrain(model_name: str, steps: int, batch: int, ddp: bool = False, **kw):
    from bench.common import with_distrain

    return with_distrain(model_name, steps, batch, strategy="ddp" if ddp else "single", **kw)


def distrain_gloo(model_name: str, steps: int, batch: int, ddp: bool = False, **kw):
    """distrain with DDP's gradients on gloo's TCP all-reduce, as the other loops have them."""
    from bench.common import with_distrain

    return with_distrain(model_name, steps, batch, strategy="ddp" if ddp else "single",
                         extra=("strategy.shared_memory=false",), **kw)


LOOPS = {"hand": hand, "hand-again": hand, "distrain": distrain, "fabric": fabric, "accelerate": accelerate, "distrain-gloo": distrain_gloo}
IMPORTS = {"hand": "torch", "distrain": "distrain.train", "fabric": "lightning", "accelerate": "accelerate"}


def available() -> list[str]:
    """The loops whose library is installed (hand-written and distrain always are)."""
    return [name for name, module in IMPORTS.items()
            if importlib.util.find_spec(module.split(".")[0]) is not None]
