"""Logs, metrics, TensorBoard, plots, the hang watchdog and the loop's throughput accounting."""
import json
import math
import time

import pytest
import torch

from conftest import CONFIGS, metrics, run_train

DIGITS = ["--config", CONFIGS / "digits_mlp.yaml", "train.epochs=null", "checkpoint.every_steps=0",
          "model.hidden=[32,32]"]


def test_two_rank_console_logs_metrics_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = tmp_path / "corpus.txt"
    text.write_text("a language model learns the patterns of its corpus. " * 300)
    run = tmp_path / "run"
    proc = run_train(["--config", CONFIGS / "gpt_tiny.yaml", f"run.dir={run}", f"data.path={text}",
                      "train.max_steps=20", "train.log_every=5", "train.eval_every=10", "data.global_batch_size=8",
                      "strategy.name=ddp", "log.tensorboard=true", "log.progress=off"], nproc=2)
    out = proc.stdout
    assert out.count("step 5/20") == 1 and out.count("eval at step 10") == 1  # rank 0's lines, once
    assert "[rank1]" not in out
    for rank in (0, 1):
        lines = (run / "logs" / f"rank{rank}.log").read_text().splitlines()
        assert lines and all(f"[rank{rank}]" in line for line in lines if line[:2] == "20")
    assert "step 5/20" in (run / "logs" / "rank0.log").read_text()
    train = metrics(run, "train")
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for r in train:
        assert 0 < r["loss"] < 10 and r["lr"] > 0 and r["grad_norm"] > 0 and r["samples_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 64)
        assert 0 < r["step_time_s"] < 60 and 0 <= r["data_wait_s"] <= r["step_time_s"]
        assert r["peak_memory_mb"] > 50 and r["skipped_steps"] == 0
    assert train[-1]["loss"] < train[0]["loss"]
    assert [e["step"] for e in metrics(run, "eval")] == [10, 20]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["best_eval"]["step"] in (10, 20)
    assert summary["checkpoint"].endswith("step_00000020")
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train])
    assert "eval/accuracy" in acc.Tags()["scalars"]


def test_library_warnings_reach_the_console_once(tmp_path):
    run = tmp_path / "run"
    proc = run_train([*DIGITS, f"run.dir={run}", "train.max_steps=4", "strategy.name=ddp",
                      "model.name=tests.faults:warning_mlp"], nproc=2, torchrun=True)
    console = proc.stdout + proc.stderr
    assert console.count("UserWarning: a library warning") == 1
    for rank in (0, 1):
        assert "a library warning" in (run / "logs" / f"rank{rank}.log").read_text()
    # a rank's own warnings reach the console from every rank, named
    assert proc.stderr.count("[rank1] WARNING a warning of rank 1's own") == 1
    assert "a warning of rank 1's own" in (run / "logs" / "rank1.log").read_text()


def test_the_progress_bar_and_log_level_quiet_the_console_not_the_log(tmp_path):
    run = tmp_path / "run"
    proc = run_train([*DIGITS, f"run.dir={run}", "train.max_steps=8", "train.log_every=4", "strategy.name=single",
                      "train.eval_every=0", "log.progress=on"])
    assert "step 4/8" not in proc.stdout and "8/8" in proc.stderr  # the bar, not the line
    assert "step 4/8" in (run / "logs" / "rank0.log").read_text()
    quiet = tmp_path / "quiet"  # log.level sets the console's level; the file keeps everything
    proc = run_train([*DIGITS, f"run.dir={quiet}", "train.max_steps=8", "train.log_every=4", "strategy.name=single",
                      "train.eval_every=0", "log.progress=off", "log.level=warning"])
    assert proc.stdout == "" and "step 4/8" in (quiet / "logs" / "rank0.log").read_text()


def test_a_slow_rank_is_named_and_its_time_recorded(tmp_path):
    run = tmp_path / "run"
    proc = run_train([*DIGITS, f"run.dir={run}", "train.max_steps=8", "train.log_every=4", "strategy.name=ddp",
                      "model.name=tests.faults:slow_rank1_mlp", "log.progress=off"], nproc=2)
    console = proc.stdout + proc.stderr
    assert console.count("straggler: rank(s) 1 spend") == 2  # one warning per log line, rank 0's only
    train = metrics(run, "train")
    assert [r["step"] for r in train] == [4, 8]
    for r in train:
        assert r["slowest_rank"] == 1 and r["busy_max_s"] >= 0.03 and r["busy_min_s"] < 0.015


def test_stragglers_against_the_lower_median():
    from distrain.metrics import stragglers

    assert stragglers([0.001, 0.01], 2.0) == [1]  # two ranks: against the faster one
    assert stragglers([0.001, 0.0015], 2.0) == []
    assert stragglers([0.001, 0.001, 0.0011, 0.005], 2.0) == [3]
    assert stragglers([0.001, 0.01], 0.0) == [] and stragglers([0.01], 2.0) == []


def test_plot_two_runs(tmp_path):
    import matplotlib.image

    from distrain.cli import main

    for name, lr in (("a", "0.003"), ("b", "0.01")):
        run_train([*DIGITS, f"run.dir={tmp_path / name}", "train.max_steps=20", "train.log_every=4",
                   "train.eval_every=10", "strategy.name=single", f"optim.lr={lr}"])
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (450, 1500)
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert main(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_watchdog_names_the_hung_rank_well_before_the_collective_timeout(tmp_path):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = run_train([*DIGITS, f"run.dir={run}", "train.max_steps=40", "strategy.name=ddp",
                      "model.name=tests.faults:killable_mlp", "model.hang_at=6", "model.hang_rank=1",
                      "log.watchdog_s=3", "strategy.timeout_s=600"], nproc=2, check=False, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 120
    assert "rank(s) 1 did not reach the step" in proc.stderr
    for rank in (0, 1):
        text = (run / "logs" / f"rank{rank}.log").read_text()
        assert f"Python stacks of rank {rank}" in text and 'File "' in text
    assert "faults.py" in (run / "logs" / "rank1.log").read_text()  # the hung frame is in the dump


def test_log_and_metrics_files_write_warnings_and_eval_lines_through_at_once(tmp_path, monkeypatch):
    """Training lines may wait (at most log.FLUSH_EVERY_S) for a later write; a warning takes
    every line before it to the file, an eval record is on disk as soon as it is written."""
    from distrain import log as dlog

    monkeypatch.setattr(dlog, "FLUSH_EVERY_S", 3600.0)  # nothing is flushed for being due
    logger = dlog.setup_logging(tmp_path, 0, 1, "warning")
    metrics_writer = dlog.MetricsWriter(tmp_path, True)
    try:
        logger.info("first line")  # the first write of each file flushes (nothing was due yet)
        metrics_writer.write({"step": 1, "split": "train", "loss": 1.0})
        logger.info("step 2 line")
        metrics_writer.write({"step": 2, "split": "train", "loss": 0.5})
        log_file = tmp_path / "logs" / "rank0.log"
        assert "step 2 line" not in log_file.read_text()  # buffered: the test of the test
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
        logger.warning("a warning")
        text = log_file.read_text()
        assert text.index("step 2 line") < text.index("a warning")
        metrics_writer.write({"step": 2, "split": "eval", "accuracy": 0.9})
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval")]
        logger.info("last line")
    finally:
        metrics_writer.close()
        dlog.close_logging()
    assert (tmp_path / "logs" / "rank0.log").read_text().rstrip().endswith("last line")


def test_window_loss_is_the_sample_weighted_mean_from_floats_or_tensors():
    from distrain.dist import Collectives
    from distrain.metrics import Window

    pairs = [(0.5, 64), (0.25, 64), (2.0, 5)]
    by_float, by_tensor = Window(), Window()
    for loss, n in pairs:
        by_float.add([(loss, n)], n, 0.01, 0.0, 0.005)
        by_tensor.add([(torch.tensor(loss), n)], n, 0.01, 0.0, 0.005)
    expected = (0.5 * 64 + 0.25 * 64 + 2.0 * 5) / 133
    for window in (by_float, by_tensor):
        loss, busy = window.reduce(Collectives(torch.device("cpu")))
        assert loss == pytest.approx(expected, rel=1e-12) and busy == [pytest.approx(0.005)]
    nan_window = Window()
    nan_window.add([(float("inf"), 4)], 4, 0.01, 0.0, 0.0)
    assert math.isnan(nan_window.reduce(Collectives(torch.device("cpu")))[0])


def test_throughput_counts_log_lines_and_collections_but_not_evaluations_or_checkpoints(tmp_path, monkeypatch):
    """samples/s and step time are the loop's wall time: what a log line costs lands in the next
    window; an evaluation or a checkpoint, timed and reported on their own, in none. On a fake
    clock that a step moves by 1 s, a log line by 10 s and an eval or a save by 1000 s."""
    from types import SimpleNamespace

    from distrain import trainer

    clock = [0.0]
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def advancing(method, seconds):
        def run(self, *args, **kwargs):
            out = method(self, *args, **kwargs)
            clock[0] += seconds
            return out
        return run

    for name, seconds in [("train_step", 1.0), ("log_train", 10.0), ("run_eval", 1000.0), ("save_checkpoint", 1000.0)]:
        monkeypatch.setattr(trainer.Trainer, name, advancing(getattr(trainer.Trainer, name), seconds))
    run = tmp_path / "run"
    from distrain.train import main

    assert main([*map(str, DIGITS), f"run.dir={run}", "train.max_steps=20", "train.log_every=5",
                 "train.eval_every=10", "checkpoint.every_steps=10", "data.global_batch_size=64"]) == 0
    rows = metrics(run, "train")
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert [r["step_time_s"] for r in rows] == [1.0, 3.0, 3.0, 3.0]  # (5 steps + the last line's 10 s) / 5
    assert [r["samples_per_s"] for r in rows] == [64.0, 64 / 3, 64 / 3, 64 / 3]
