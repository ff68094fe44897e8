"""skypilot/distrain.yaml: its run section, given the SKYPILOT_* variables of a 2-node job (both
nodes on loopback, one CPU process each), trains the same weights as one torchrun with 2 processes."""
import os
import socket
import subprocess
import sys

import yaml

from conftest import CONFIGS, ROOT, clean_env, final_weights, run_train

TRAIN = ["train.epochs=null", "train.max_steps=30", "train.log_every=10", "checkpoint.every_steps=10",
         "model.hidden=[32,32]", "strategy.name=ddp"]


def test_the_run_section_on_two_nodes_matches_one_torchrun(tmp_path):
    task = yaml.safe_load((ROOT / "skypilot" / "distrain.yaml").read_text())
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    skypilot = {"SKYPILOT_NUM_NODES": str(task["num_nodes"]), "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1\n",
                "SKYPILOT_NUM_GPUS_PER_NODE": "1"}
    envs = {k: str(v) for k, v in task["envs"].items()}
    envs.update(MASTER_PORT=str(port), OVERRIDES=" ".join([envs["OVERRIDES"], *TRAIN, f"run.dir={run}"]))
    assert envs["CONFIG"] == "configs/digits_mlp.yaml"
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # torchrun of this environment
    nodes = [subprocess.Popen(["bash", "-c", task["run"]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=clean_env(PATH=path, SKYPILOT_NODE_RANK=str(rank), GLOO_SOCKET_IFNAME="lo",
                                                       **skypilot, **envs))
             for rank in range(task["num_nodes"])]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "ddp on 2 process(es) (skypilot)" in (run / "logs" / "rank0.log").read_text()
    reference = tmp_path / "reference"
    run_train(["--config", CONFIGS / "digits_mlp.yaml", *TRAIN, f"run.dir={reference}"], nproc=2)
    ours, theirs = final_weights(run), final_weights(reference)
    assert all(ours[k].equal(theirs[k]) for k in theirs)
