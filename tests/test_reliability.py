"""Nothing is lost, every bad input gets a clear answer (issue "Reliability"): a scheduler's SIGTERM to
torchrun, SIGKILL while a checkpoint is written, a truncated or foreign last.pt, two torchrun launches as
two nodes, bad data and arguments, checkpoints of the wrong kind, a non-finite loss."""
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT, TINY, free_port, last_line, launch, metrics, run, same_rows, same_weights, weights


def snapshot(folder):
    """Every file under `folder` with a hash of its bytes: to show that an error changed nothing (but the
    folder's hold, which names the last process that held it)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != "hold"}


def fails_cleanly(p, *words):
    """A non-zero exit, no traceback, and one line that says what was wrong: the last line of a plain run;
    under torchrun, whose launcher then prints its own failure report, a line of the workers' output."""
    assert p.returncode != 0, last_line(p)
    if "torch.distributed.run" in p.args:
        assert not re.search(rf'File "{ROOT}/(tests/)?\w+\.py"', p.stderr), p.stderr[-3000:]  # none through our code
        line = next(l for l in p.stderr.replace("\r", "\n").splitlines() if l.startswith("error: "))
    else:  # the last line of stderr, where errors go (stdout may hold the epochs' rows)
        assert "Traceback" not in p.stderr + p.stdout, p.stderr[-2000:]
        line = [l for l in p.stderr.replace("\r", "\n").splitlines() if l.strip()][-1]
    assert line.startswith("error: ") and all(w in line for w in words), line
    return line


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished 1-epoch baseline run folder (10 classes) to break things around."""
    out = tmp_path_factory.mktemp("done") / "baseline"
    run("baseline.py", *TINY, "--labels", "10", "--epochs", "1", "--out", out)
    return out


# ---------------------------------------------------------------- preemption ----
def test_sigkill_while_saving_leaves_the_previous_checkpoint(done, tmp_path):
    folder = tmp_path / "run"
    subprocess.run(["cp", "-r", str(done), str(folder)], check=True)
    before = common.load_checkpoint(str(folder / "last.pt"))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch; sys.path.insert(0, '.'); import common\n"
        f"big = {{'model': {{'w': torch.randn(100_000_000)}}, 'args': {{}}, 'step': 99}}\n"
        f"common.save_atomic(big, {str(folder / 'last.pt')!r})")], cwd=ROOT)
    tmp = folder / "last.pt.tmp"
    while not (tmp.exists() and tmp.stat().st_size > 10_000_000):
        assert writer.poll() is None, "the writer finished before it could be killed"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    after = common.load_checkpoint(str(folder / "last.pt"))
    assert after["step"] == before["step"] and same_weights(after["model"], before["model"])
    run("baseline.py", *TINY, "--labels", "10", "--epochs", "2", "--out", folder)  # resumes, ignores the .tmp
    assert [r["epoch"] for r in metrics(folder)] == [1, 2]


@pytest.mark.parametrize("kind", ["truncated", "foreign", "other method", "other arguments"])
def test_a_bad_last_pt_is_an_error_not_a_fresh_start(kind, done, tmp_path):
    folder = tmp_path / "run"
    subprocess.run(["cp", "-r", str(done), str(folder)], check=True)
    ck = folder / "last.pt"
    script, flags = "baseline.py", [*TINY, "--labels", "10", "--epochs", "2"]
    if kind == "truncated":
        ck.write_bytes(ck.read_bytes()[:5000])
    elif kind == "foreign":
        torch.save({"state": [1, 2, 3]}, ck)
    elif kind == "other method":
        script, flags = "rotation.py", flags
    else:
        flags = [*flags, "--lr", "0.3"]
    before = snapshot(folder)
    line = fails_cleanly(run(script, *flags, "--out", folder, check=False))
    assert snapshot(folder) == before
    assert {"truncated": "not a readable", "foreign": "not a readable", "other method": "is a baseline checkpoint",
            "other arguments": "was made with --lr 0.1"}[kind] in line


# ---------------------------------------------------------------- two nodes ----
@pytest.mark.parametrize("script,flags", [("rotation.py", ["--labels", "10"])])  # two data streams: the harder case
def test_two_nodes_match_one_node(script, flags, tmp_path):
    """Two torchrun launches as two nodes (c10d rendezvous on 127.0.0.1), one process each, against one
    launch of two processes: the same weights, bit for bit."""
    flags = [*TINY, *flags, "--epochs", "2", "--deterministic"]
    run(script, *flags, "--out", tmp_path / "one", nproc=2)
    port, out = free_port(), tmp_path / "two"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "s4l-test",
         str(ROOT / script), *map(str, flags), "--out", str(out)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert same_weights(weights(tmp_path / "one" / "final.pt"), weights(out / "final.pt"))
    assert same_rows(metrics(tmp_path / "one"), metrics(out))


# ---------------------------------------------------------------- bad input ----
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Small ImageFolder trees: good, empty, mismatched classes, with a corrupt image."""
    root = tmp_path_factory.mktemp("data")
    good = Path(common.make_synthetic(str(root / "good"), 3, 12, 24))
    (root / "empty" / "train" / "a").mkdir(parents=True)
    (root / "empty" / "val" / "a").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(good), str(root / "mismatch")], check=True)
    (root / "mismatch" / "val" / "c002").rename(root / "mismatch" / "val" / "c009")
    subprocess.run(["cp", "-r", str(good), str(root / "corrupt")], check=True)
    (root / "corrupt" / "train" / "c001" / "00003.jpg").write_bytes(b"this is not a JPEG")
    (root / "corrupt" / "train" / "c001" / "notes.txt").write_text("not an image: ignored")
    return root


SMALL = ["--arch", "resnet18", "--width", "0.25", "--img-size", "16", "--workers", "0", "--epochs", "1", "--batch-size", "4"]


@pytest.mark.parametrize("data,flags,words", [
    ("nowhere", [], ["no such folder"]),
    ("empty", [], ["no images"]),
    ("mismatch", [], ["different classes", "c002", "c009"]),
    ("corrupt", ["--labels", "100"], ["cannot read image", "00003.jpg", "--skip-bad-images"]),
    ("good", ["--labels", "150"], ["--labels", "not a number in [0, 100]"]),
    ("good", ["--labels", "-1"], ["--labels", "not a number in [0, 100]"]),
    ("good", ["--labels", "90", "--val-split", "custom", "--val-size", "9"], ["labeled images per class", "has only"]),
    ("good", ["--val-split", "custom", "--val-size", "99"], ["class-balanced subset", "has only"]),
    ("good", ["--split-file", "/nonexistent/list.txt"], ["no such file"]),
])
def test_bad_data_and_arguments_one_line_and_nothing_overwritten(data, flags, words, folders, done, tmp_path):
    """Checked before anything is written: aimed at a finished run's folder, the error leaves it as it was.
    (An unreadable image is found when it is first read, in training: aimed at a new folder.)"""
    folder = tmp_path / "run"
    if data != "corrupt":
        subprocess.run(["cp", "-r", str(done), str(folder)], check=True)
    before = snapshot(folder) if folder.exists() else None
    fails_cleanly(run("baseline.py", *SMALL, "--data", folders / data, *flags, "--out", folder, check=False), *words)
    if before is not None:
        assert snapshot(folder) == before
    else:
        assert not (folder / "last.pt").exists()


def test_skip_bad_images_counts_them(folders, tmp_path):
    run("baseline.py", *SMALL, "--data", folders / "corrupt", "--labels", "100", "--skip-bad-images", "--out", tmp_path)
    assert metrics(tmp_path)[0]["skipped_images"] == 1
    path, why = (tmp_path / "skipped.txt").read_text().strip().split("\t")  # the file, and why
    assert path.endswith("c001/00003.jpg") and why.startswith("cannot read image")


def test_batch_not_divisible_by_the_processes(tmp_path):
    fails_cleanly(run("baseline.py", *TINY, "--batch-size", "33", "--out", tmp_path, nproc=2, check=False), "divisible")


def test_checkpoints_of_the_wrong_kind(done, tmp_path):
    ssl = tmp_path / "ssl"
    run("rotation.py", *TINY, "--labels", "0", "--epochs", "1", "--synthetic", "10,10,48", "--out", ssl)
    fails_cleanly(run("linear_eval.py", *TINY, "--arch", "resnet34", "--ckpt", done / "final.pt", "--out",
                      tmp_path / "a", check=False), "was made with --arch resnet18, this run has resnet34")
    fails_cleanly(run("linear_eval.py", *[a if a != "0.25" else "0.5" for a in TINY], "--ckpt", done / "final.pt",
                      "--out", tmp_path / "b", check=False), "was made with --width 0.25, this run has 0.5")
    fails_cleanly(run("pseudolabel.py", *TINY, "--labels", "0", "--teacher", done / "final.pt", "--out", tmp_path / "c",
                      check=False), "needs labels")
    fails_cleanly(run("pseudolabel.py", *TINY, "--teacher", ssl / "final.pt", "--synthetic", "10,10,48",
                      "--out", tmp_path / "d", check=False), "was made with --labels 0, this run has 10:")
    fails_cleanly(run("pseudolabel.py", *TINY, "--teacher", done / "final.pt", "--synthetic", "7,20,48",
                      "--out", tmp_path / "e", check=False), "class 7 ['c007'], this run has []")
    fails_cleanly(run("moam.py", *TINY, "--step", "2", "--init", done / "final.pt", "--out", tmp_path / "f",
                      check=False), "not a moam step-1 checkpoint")
    fails_cleanly(run("linear_eval.py", *TINY, "--ckpt", tmp_path / "nothing.pt", "--out", tmp_path / "g",
                      check=False), "no such checkpoint")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    flags = [*TINY, "--labels", "10", "--epochs", "3"]
    run("baseline.py", *flags, "--epochs", "1", "--out", tmp_path)  # last.pt at step 3
    before = snapshot(tmp_path)
    line = fails_cleanly(launch(["--nan-at", 4], "baseline.py", *flags, "--out", tmp_path, nproc=2, check=False),
                         "non-finite L_sup at step 4")
    assert "(step 3)" in line and snapshot(tmp_path)["last.pt"] == before["last.pt"]
    assert len(metrics(tmp_path)) == 1


def test_every_torch_load_is_weights_only():
    for f in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]:
        for call in re.findall(r"torch\.load\([^\n]*", f.read_text()):
            assert "weights_only=True" in call, (f.name, call)
