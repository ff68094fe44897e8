"""The launch/ scripts against real torchrun: two agents as two nodes, elastic restarts,
and a rank dying without an agent to clean up."""
import os
import socket
import subprocess
import sys
import time

from conftest import CONFIGS, ROOT, clean_env, final_weights, run_train

ARGS = ["--config", CONFIGS / "digits_mlp.yaml", "train.epochs=null", "train.max_steps=60", "train.log_every=20",
        "checkpoint.every_steps=10", "model.hidden=[32,32]", "strategy.name=ddp"]


def venv_env(**extra):
    return clean_env(PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **extra)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(tmp_path, model_args=()):
    run = tmp_path / "reference"
    run_train([*ARGS, f"run.dir={run}", *model_args], nproc=2)
    return final_weights(run)


def test_two_torchrun_agents_as_two_nodes_match_one_node(tmp_path):
    run = tmp_path / "run"
    env = venv_env(NNODES="2", NPROC="1", HEAD=f"127.0.0.1:{free_port()}", RUN_ID="two-nodes")
    agents = [subprocess.Popen(["bash", ROOT / "launch" / "multi_node.sh", *map(str, ARGS), f"run.dir={run}"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=180)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs
    ours, ref = final_weights(run), reference(tmp_path)
    assert all(ours[k].equal(ref[k]) for k in ref)


def test_elastic_restart_after_a_worker_is_killed_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    model = ["model.name=tests.faults:killable_mlp", f"model.marker={tmp_path / 'killed'}"]
    proc = subprocess.run(["bash", ROOT / "launch" / "elastic.sh", *map(str, ARGS), f"run.dir={run}", *model,
                           "model.kill_at=35", "model.kill_rank=1"], cwd=ROOT, text=True, capture_output=True,
                          timeout=300, env=venv_env(NPROC="2", MAX_RESTARTS="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "killed.rank1").exists()
    assert "resumed from" in proc.stdout and "step_00000030" in proc.stdout
    ours, ref = final_weights(run), reference(tmp_path, ["model.name=tests.faults:killable_mlp"])
    assert all(ours[k].equal(ref[k]) for k in ref)


def test_a_dead_rank_does_not_hang_the_others(tmp_path):
    """No torchrun agent to tear the group down: rank 0 must notice rank 1 is gone and exit non-zero
    within strategy.timeout_s, saying what happened."""
    run, port, timeout_s = tmp_path / "run", free_port(), 20
    args = [sys.executable, "-m", "distrain.train", *map(str, ARGS), f"run.dir={run}",
            "model.name=tests.faults:killable_mlp", "model.kill_at=15", "model.kill_rank=1",
            f"model.marker={tmp_path / 'killed'}", f"strategy.timeout_s={timeout_s}"]
    start = time.monotonic()
    procs = [subprocess.Popen(args, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=clean_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    out0, err0 = procs[0].communicate(timeout=timeout_s + 60)
    elapsed = time.monotonic() - start
    procs[1].wait(timeout=30)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 1 and elapsed < timeout_s + 30
    assert "training failed on rank 0" in err0
    assert "rank" in (run / "logs" / "rank0.log").read_text()


def test_a_finished_process_skips_the_interpreter_teardown_after_flushing():
    # teardown can abort in gloo's worker threads after a successful run: the exit code must be the run's
    code = ("import atexit, logging, sys; from distrain.train import end_process; "
            "atexit.register(lambda: print('teardown ran')); "
            "logging.basicConfig(stream=sys.stderr); logging.getLogger('x').warning('logged'); "
            "print('printed', end=''); end_process(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert (proc.returncode, proc.stdout) == (3, "printed")
    assert "logged" in proc.stderr
