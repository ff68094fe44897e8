"""DCP async save: training goes on while the checkpoint is written; the result is the same."""
from conftest import CONFIGS, final_weights, run_train

ARGS = ["--config", CONFIGS / "digits_mlp.yaml", "train.epochs=null", "train.max_steps=30", "train.log_every=10",
        "checkpoint.every_steps=8", "model.hidden=[32,32]", "strategy.name=fsdp", "checkpoint.keep_last=10"]


def test_async_save_commits_the_same_checkpoints_and_resumes_exactly(tmp_path):
    sync, background = tmp_path / "sync", tmp_path / "async"
    run_train([*ARGS, f"run.dir={sync}"], nproc=2)
    run_train([*ARGS, f"run.dir={background}", "checkpoint.async_save=true"], nproc=2)
    # written in the background: step 8's checkpoint is committed only after training went on past it
    # (its commit comes after the step-10 log line; a synchronous save commits before it)
    for run, background_save in ((sync, False), (background, True)):
        lines = (run / "logs" / "rank0.log").read_text().splitlines()
        committed = next(i for i, line in enumerate(lines) if "step_00000008 committed" in line)
        logged = next(i for i, line in enumerate(lines) if "step 10/30" in line)
        assert (committed > logged) == background_save
    names = sorted(p.name for p in (background / "checkpoints").iterdir())
    assert names == ["latest", "step_00000008", "step_00000016", "step_00000024", "step_00000030"]
    a, b = final_weights(sync), final_weights(background)
    assert all(a[k].equal(b[k]) for k in a)
    # resume from an asynchronously written checkpoint: same end point
    resumed = tmp_path / "resumed"
    run_train([*ARGS, f"run.dir={resumed}", "checkpoint.async_save=true",
               f"checkpoint.resume={background / 'checkpoints' / 'step_00000016'}"], nproc=2)
    c = final_weights(resumed)
    assert all(a[k].equal(c[k]) for k in a)
