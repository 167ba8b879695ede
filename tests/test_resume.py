"""Resuming as clusters do it (issue "Real clusters"): every flag README lets change on a resume does change,
and a job requeued on another number of processes continues at the same step, on the same data."""
import shutil

import numpy as np
import pytest
import torch

import common
from conftest import TINY, launch, metrics, run, same_rows

FLAGS = [*TINY, "--labels", "10", "--deterministic"]

# Every entry of common.MAY_CHANGE but the test-only ones, and what the resumed run passes for it.
CHANGES = {
    "epochs": [], "workers": ["--workers", "1"], "out": [], "data": [], "compile": ["--compile"],
    "eval_every": ["--eval-every", "2", "--epochs", "3"], "log_every": ["--log-every", "3"],
    "save_every": ["--save-every", "0.001"], "val_subsets": ["--val-subsets", "50"],
    "skip_bad_images": ["--skip-bad-images"], "deterministic": ["--no-deterministic"],
    "amp": ["--amp", "bf16"], "channels_last": ["--no-channels-last"],
}


def test_every_flag_that_may_change_is_tested():
    assert set(CHANGES) == common.MAY_CHANGE


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    out = tmp_path_factory.mktemp("may_change") / "run"
    run("baseline.py", *FLAGS, "--epochs", "1", "--out", out)
    return out


@pytest.mark.parametrize("flag", CHANGES)
def test_a_flag_that_may_change_does(flag, one_epoch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    extra = list(CHANGES[flag])
    if flag == "data":  # the same images at another path
        shutil.copytree(out / "synthetic-10x100-48px", tmp_path / "moved")
        extra = ["--data", tmp_path / "moved"]
    flags = [f for f in FLAGS if f != "--deterministic"] if flag == "deterministic" else FLAGS
    if flag == "deterministic":
        extra = []
    if flag == "data":
        flags = [f for f in flags if f != "synthetic" and f != "--data"]
    p = run("baseline.py", *flags, "--epochs", "2", *extra, "--out", out)
    assert "resumed" in p.stdout
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1)) and rows[0] == metrics(one_epoch)[0]
    assert torch.load(out / "final.pt", weights_only=True)["step"] == 3 * len(rows)


def test_amp_fp16_on_resume_starts_a_gradient_scaler(one_epoch, tmp_path):
    """The reported traceback: a run without --amp resumed with --amp fp16 (an empty scaler state)."""
    shutil.copytree(one_epoch, tmp_path / "run")
    run("baseline.py", *FLAGS, "--epochs", "2", "--amp", "fp16", "--out", tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]  # now a live GradScaler


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(before, after, tmp_path):
    """The same global batch over 2 processes, then 1 (and back): the run goes on at the step it was stopped
    at; its step, schedule and loss sums are those of the world size of each step (batch-norm statistics
    per process and the order of reductions cannot be exact: the losses agree to a tolerance)."""
    flags = [*FLAGS, "--epochs", "2", "--log-every", "1"]
    run("rotation.py", *flags, "--out", tmp_path / "whole", nproc=before)
    p = launch(["--stop-at", 4], "rotation.py", *flags, "--out", tmp_path / "cut", nproc=before, check=False)
    at = 4 + (before > 1)
    assert p.returncode != 0 and torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == at
    p = run("rotation.py", *flags, "--out", tmp_path / "cut", nproc=after)
    assert f"resumed {tmp_path / 'cut' / 'last.pt'} at step {at}" in p.stdout
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [(r["epoch"], r["step"], r["lr"]) for r in whole] == [(r["epoch"], r["step"], r["lr"]) for r in cut]
    assert same_rows(whole[:1], cut[:1])  # epoch 1 ran on the same processes
    for w, c in zip(whole, cut):
        for k in ("L_sup", "L_rot"):
            assert c[k] == pytest.approx(w[k], rel=0.1), (k, w, c)  # counted twice would be 2x


def test_samplers_resume_at_any_step_on_any_number_of_processes():
    """The data of step s: the same images and crops (seeds) whether 1, 2 or 4 processes draw them, from
    the start of the epoch or resumed at s (EpochBatches), and in the endless unlabeled stream."""
    idx = np.arange(3, 203)
    for start in (0, 3, 5):
        ref = common.EpochBatches(idx, 8, 7, 0, 1)
        ref.set_epoch(2, start)
        ref = list(ref)
        for world in (2, 4):
            ranks = []
            for r in range(world):
                b = common.EpochBatches(idx, 8, 7, r, world)
                b.set_epoch(2, start)
                ranks.append(list(b))
            assert [sum((rk[s] for rk in ranks), []) for s in range(len(ref))] == ref
            stream = [common.StreamBatches(idx, 8, 7, r, world, stream=1) for r in range(world)]
            for s in stream:
                s.start = start
            ref_stream = common.StreamBatches(idx, 8, 7, 0, 1, stream=1)
            ref_stream.start = start
            got = [next(iter(s)) for s in stream]
            assert sum(got, []) == next(iter(ref_stream))
