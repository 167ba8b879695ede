"""Trust (issue "Trust, round 2"): a run never mixes with another, a checkpoint called good is good, logs
that batch systems keep, requeue only what can succeed, inputs that must not pass. Each kind is fixed in
the one place that owns it (common.hold, check_data, Run.write, save_atomic, read_image, _exit_code) and
tested here by its reported instance and its other instances."""
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, TINY, free_port, launch, metrics, run
from test_reliability import fails_cleanly

FLAGS = [*TINY, "--labels", "10"]
HOST = socket.gethostname()


def started(script, args, pause, tmp, nproc=1):
    """A run held at a pause point (tests/launch.py), its pid written to tmp/paused."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    p = subprocess.Popen([*launcher, str(ROOT / "tests" / "launch.py"), "--pause", pause, str(tmp / "paused"),
                          str(ROOT / script), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    t = time.time()
    while not (tmp / "paused").exists():
        assert p.poll() is None and time.time() - t < 120, p.communicate()[1][-2000:]
        time.sleep(0.1)
    return p, int((tmp / "paused").read_text().split()[0])


# ---------------------------------------------------------------- 1. a run never mixes with another ----
def test_a_second_run_into_a_held_folder_is_refused(tmp_path):
    """The reported cases: seeds 0 and 1 into one --out, and the same command twice; and under torchrun. The
    second is refused in one line naming the holder; the first ends as if alone."""
    out, flags = tmp_path / "out", [*FLAGS, "--epochs", "2"]
    first, pid = started("baseline.py", [*flags, "--out", out], "train-images", tmp_path)
    for second, nproc in [([*flags, "--seed", "1"], 1), (flags, 1), (flags, 2)]:
        p = run("baseline.py", *second, "--out", out, nproc=nproc, check=False)
        line = fails_cleanly(p, f"--out {out} is in use by pid {pid} on {HOST}")
        assert [l.startswith("error: ") for l in p.stderr.splitlines()].count(True) == 1, p.stderr[-2000:]
    (tmp_path / "paused").unlink()
    assert first.wait(120) == 0, first.communicate()[1][-2000:]
    assert [r["epoch"] for r in metrics(out)] == [1, 2] and json.load(open(out / "args.json"))["seed"] == 0
    assert torch.load(out / "final.pt", weights_only=True)["args"]["seed"] == 0


@pytest.mark.parametrize("how", ["SIGKILL", "SIGKILL, workers alive"])
def test_the_hold_of_a_dead_run_never_blocks_the_resume(how, tmp_path):
    """A killed run (its DataLoader workers, which share the lock, die with it) leaves a hold the next run
    takes at once."""
    out, flags = tmp_path / "out", [*FLAGS, "--epochs", "1", "--workers", "2" if "workers" in how else "0"]
    pause = "train-images" if "workers" not in how else "scan"
    first, pid = started("baseline.py", [*flags, "--out", out], pause, tmp_path)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(1)
    p = run("baseline.py", *flags, "--out", out)
    assert "in use" not in p.stderr and (out / "final.pt").exists()


def lock_elsewhere(path):
    """Another process holding `path`'s lock (as a run on another node would), its file naming that node."""
    path.write_text("pid 4242 on another-node")
    locker = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                               str(path)], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    return locker


def test_another_hosts_hold_is_waited_for_until_its_lease_lapses(tmp_path, monkeypatch):
    """A hold from another host may be a dead node's whose lock the shared file system has not freed yet: it
    is waited for, then taken (here its lock goes after three waits); one that outlasts 3 minutes is refused."""
    locker, waits = lock_elsewhere(tmp_path / "hold"), []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 3:  # the lease lapses
            locker.kill()
            locker.wait()
    monkeypatch.setattr(common.time, "sleep", sleep)
    monkeypatch.setattr(common._state, "held", [])
    common.hold(str(tmp_path))
    assert len(waits) == 3 and (tmp_path / "hold").read_text() == f"pid {os.getpid()} on {HOST}"
    common._state.held[0].close()
    locker = lock_elsewhere(tmp_path / "hold")
    monkeypatch.setattr(common.time, "sleep", lambda seconds: waits.append(seconds))
    monkeypatch.setattr(common._state, "held", [])
    with pytest.raises(common.UserError, match=f"--out {tmp_path} is in use by pid 4242 on another-node"):
        common.hold(str(tmp_path))
    assert sum(waits[3:]) >= 180
    locker.kill()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Checkpoints to read: a baseline (custom hold-out of 100 images), a MOAM step 1, their data trees."""
    root = tmp_path_factory.mktemp("trained")
    flags = [*FLAGS, "--epochs", "1", "--val-split", "custom", "--val-size", "100"]
    run("baseline.py", *flags, "--out", root / "baseline")
    run("moam.py", *FLAGS, "--width", "0.25", "--epochs", "1", "--step", "1", "--out", root / "moam" / "step1")
    tree = root / "baseline" / "synthetic-10x100-48px"
    renamed = root / "renamed"  # the same images, class folders named so that they sort the other way
    for c in range(10):
        shutil.copytree(tree / "train" / f"c{c:03d}", renamed / "train" / f"x{9 - c}")
        shutil.copytree(tree / "val" / f"c{c:03d}", renamed / "val" / f"x{9 - c}")
    return root, flags


READERS = {  # name: (script, extra flags, the words the one line must hold)
    "teacher of another class list": ("pseudolabel.py", ["--data", "{renamed}"], "class 0 ['c000'], this run has ['x0']"),
    "teacher of another split seed": ("pseudolabel.py", ["--split-seed", "1"], "--split-seed 0, this run has 1"),
    "teacher of another --img-size": ("pseudolabel.py", ["--img-size", "40"], "--img-size 32, this run has 40"),
    "teacher of another --crop": ("pseudolabel.py", ["--crop", "pad"], "--crop inception, this run has pad"),
    "teacher of another hold-out": ("pseudolabel.py", ["--val-size", "200"], "--val-size 100, this run has 200"),
    "MOAM step 2 from a step 1 of another split": ("moam.py", ["--step", "2", "--split-seed", "1"],
                                                   "--split-seed 0, this run has 1"),
    "linear_eval scoring a hold-out it trained on": ("linear_eval.py", ["--split-seed", "2"],
                                                     "--split-seed 0, this run has 2"),
    "linear_eval --normalize of a network without": ("linear_eval.py", ["--normalize"],
                                                     "--normalize False, this run has True"),
    "MOAM step 2 --normalize from a step 1 without": ("moam.py", ["--step", "2", "--normalize"],
                                                      "--normalize False, this run has True"),
}


@pytest.mark.parametrize("case", READERS)
def test_every_reader_of_a_checkpoint_checks_its_data(case, trained, tmp_path):
    root, flags = trained
    script, extra, words = READERS[case]
    extra = [e.format(renamed=root / "renamed") for e in extra]
    if script == "pseudolabel.py":
        extra += ["--teacher", root / "baseline" / "final.pt"]
    elif script == "linear_eval.py":
        extra += ["--ckpt", root / "baseline" / "final.pt"]
    else:
        flags = [*FLAGS, "--width", "0.25", "--epochs", "1"]
        extra += ["--init", root / "moam" / "step1" / "final.pt"]
    fails_cleanly(run(script, *flags, *extra, "--out", tmp_path / "out", check=False), words)


def test_a_transfer_to_another_data_set_is_allowed(trained, tmp_path):
    """linear_eval.py on another data set (Section 6): other classes, no data check but the network's."""
    root, flags = trained
    run("linear_eval.py", *TINY, "--labels", "100", "--epochs", "1", "--data", root / "renamed",
        "--ckpt", root / "baseline" / "final.pt", "--out", tmp_path / "out")
    assert metrics(tmp_path / "out")[0]["top1"] >= 0


@pytest.fixture(scope="module")
def normalized(tmp_path_factory):
    """A baseline with the small-image network options (--normalize: a layer of its own)."""
    out = tmp_path_factory.mktemp("normalized") / "baseline"
    run("baseline.py", *FLAGS, "--epochs", "1", "--normalize", "--zero-init-last", "--out", out)
    return out


@pytest.mark.parametrize("reader", ["resume", "linear_eval.py", "pseudolabel.py"])
def test_every_reader_builds_a_normalized_network_from_its_checkpoint(reader, normalized, tmp_path):
    """linear_eval takes --normalize from the checkpoint (its input layer and running statistics kept);
    a teacher's network is its own, whatever the student's; a resume restores the statistics."""
    ck, out = torch.load(normalized / "final.pt", weights_only=True), tmp_path / "out"
    stats = ck["model"]["stem.0.running_mean"]
    if reader == "resume":
        shutil.copytree(normalized, out)
        run("baseline.py", *FLAGS, "--epochs", "2", "--normalize", "--zero-init-last", "--out", out)
        assert [r["epoch"] for r in metrics(out)] == [1, 2]
    elif reader == "linear_eval.py":  # the trunk frozen, in eval mode: the statistics stay the checkpoint's
        run(reader, *FLAGS, "--epochs", "1", "--ckpt", normalized / "final.pt", "--out", out)
        assert torch.equal(torch.load(out / "final.pt", weights_only=True)["model"]["stem.0.running_mean"], stats)
    else:  # a student without --normalize
        run(reader, *FLAGS, "--epochs", "1", "--teacher", normalized / "final.pt", "--out", out)
        assert "stem.0.running_mean" not in torch.load(out / "final.pt", weights_only=True)["model"]
    assert metrics(out)[-1]["top1"] >= 0


@pytest.mark.parametrize("change", ["an image added", "a class renamed"])
def test_a_resume_on_a_changed_data_folder_is_refused(change, trained, tmp_path):
    root, flags = trained
    data = tmp_path / "data"
    shutil.copytree(root / "baseline" / "synthetic-10x100-48px", data)
    args = [*flags, "--data", data, "--out", tmp_path / "out"]
    run("baseline.py", *args)
    if change == "an image added":
        shutil.copy(data / "train" / "c003" / "00000.jpg", data / "train" / "c003" / "00000b.jpg")
        words = "a labeled subset of 100 images"
    else:
        for split in ("train", "val"):
            os.rename(data / split / "c009", data / split / "d009")
        words = "class 9 ['c009'], this run has ['d009']"
    fails_cleanly(run("baseline.py", *args, "--epochs", "2", check=False), words, "resume on the same data")


# ---------------------------------------------------------------- 2. a checkpoint called good is good ----
def finite(path):
    return all(t.isfinite().all() for t in torch.load(path, weights_only=True)["model"].values()
               if t.is_floating_point())


@pytest.mark.parametrize("case", ["the reported --lr 1e4", "a loss turned NaN", "a buffer turned inf"])
def test_no_checkpoint_is_written_with_a_non_finite_weight(case, tmp_path):
    """The reported case wrote inf batch-norm variances into last.pt while the loss was still finite: no
    checkpoint is written unless every weight and buffer is finite, and the line names one to resume from."""
    out = tmp_path / "out"
    if "1e4" in case:
        hooks, flags = [], [*FLAGS, "--lr", "1e4", "--warmup", "0", "--log-every", "1", "--epochs", "3"]
    else:  # from a good last.pt at step 3
        hooks = ["--nan-at", 4] if "NaN" in case else ["--inf-buffer-at", 4]
        flags = [*FLAGS, "--epochs", "3"]
        run("baseline.py", *flags, "--epochs", "1", "--out", out)
    p = launch(hooks, "baseline.py", *flags, "--out", out, check=False)
    line = fails_cleanly(p, "non-finite", "the last good checkpoint is")
    named = re.search(r"checkpoint is (\S+) \(step (\d+)\)$", line)
    assert not (out / "final.pt").exists() and not (out / "stopped").exists()
    if named:  # a checkpoint to resume from: finite, the one last.pt is
        assert finite(named.group(1)) and torch.load(out / "last.pt", weights_only=True)["step"] == int(named.group(2))
    else:
        assert line.endswith("checkpoint is none") and not (out / "last.pt").exists(), line
    assert "1e4" in case or named, line


@pytest.mark.parametrize("file", ["last.pt", "final.pt", "pseudo_labels.pt"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary(file, tmp_path, teacher):
    """A real ENOSPC: the temporary file is /dev/full."""
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("/dev/full", out / f"{file}.tmp")
    script, extra = ("pseudolabel.py", ["--teacher", teacher / "final.pt"]) if file == "pseudo_labels.pt" else (
        "baseline.py", [])
    p = run(script, *FLAGS, "--epochs", "1", *extra, "--out", out, check=False)
    fails_cleanly(p, f"cannot write {out / file} (No space left on device)")
    assert not os.path.lexists(out / f"{file}.tmp")


def test_a_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("chattr +i is not permitted here")
    try:
        p = run("baseline.py", *FLAGS, "--epochs", "1", "--out", out, check=False)
        fails_cleanly(p, f"cannot write to --out {out} (Operation not permitted)")
    finally:
        subprocess.run(["chattr", "-i", str(out)])
    assert not any(out.iterdir())


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(tmp_path):
    p = launch(["--free-bytes", 1000], "baseline.py", *FLAGS, "--epochs", "1", "--out", tmp_path, check=False)
    fails_cleanly(p, f"--out {tmp_path} has 0 MiB free, a checkpoint of this run takes about")
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------- 3. logs that batch systems keep ----
def test_a_log_file_gets_one_plain_line_per_log_every_steps(tmp_path):
    p = run("baseline.py", *FLAGS, "--epochs", "2", "--log-every", "2", "--out", tmp_path)
    lines = [line for line in p.stderr.splitlines() if line.startswith("epoch ")]
    assert "\r" not in p.stderr and [line.split(" L_sup")[0].split(" lr")[0] for line in lines] == [
        "epoch 1/2 step 2/3", "epoch 2/2 step 1/3", "epoch 2/2 step 3/3"]
    assert all(re.search(r"lr \S+ L_sup \d+\.\d+ img_s \d+$", line) for line in lines)


def test_on_a_terminal_an_error_line_starts_a_line_of_its_own(tmp_path):
    """With a progress bar drawn, the error that ends the run begins at the start of a line."""
    run("baseline.py", *FLAGS, "--epochs", "0", "--out", tmp_path)  # the data
    bad = sorted((tmp_path / "synthetic-10x100-48px" / "val" / "c004").iterdir())[0]
    bad.write_bytes(b"not an image")
    pid, fd = pty.fork()
    if pid == 0:  # a terminal of 120 columns
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "baseline.py", *FLAGS, "--epochs", "1", "--out", str(tmp_path)],
                  {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    text = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        text += chunk
    os.waitpid(pid, 0)
    text = text.decode(errors="replace")
    assert "epoch 1/1" in text and "\r" in text  # the bar
    assert re.search(r"(^|[\r\n])error: cannot read image " + re.escape(str(bad)), text), text[-1500:]


@pytest.mark.parametrize("rank", [0, 1])
def test_the_rank_that_fails_has_the_last_word(rank, tmp_path):
    """An unreadable validation image that only one rank reads: its error is the one line, the other rank
    ends quietly (no "Connection closed by peer", no stop line), and torchrun's report names it."""
    run("baseline.py", *FLAGS, "--epochs", "0", "--out", tmp_path)
    val = sorted((tmp_path / "synthetic-10x100-48px" / "val").rglob("*.jpg"))
    val[rank].write_bytes(b"not an image")  # evaluation gives rank r the images r, r + 2, ...
    p = run("baseline.py", *FLAGS, "--epochs", "1", "--out", tmp_path, nproc=2, check=False)
    fails_cleanly(p, "cannot read image", str(val[rank]))
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "stopped by" not in p.stderr, p.stderr[-3000:]
    assert "Connection closed" not in p.stderr and "Connection reset" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"traceback : error: cannot read image", p.stderr), p.stderr[-1500:]


# ---------------------------------------------------------------- 4. requeue only what can succeed ----
def slurm_script():
    text = (ROOT / "README.md").read_text()
    return re.search(r"```bash\n(#!/bin/bash\n#SBATCH.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("outcome,attempt,requeued", [("stopped", 0, True), ("error", 0, False),
                                                       ("stopped", 20, False), ("done", 0, False)])
def test_the_slurm_script_requeues_only_a_stopped_run(outcome, attempt, requeued, tmp_path):
    """README's script, run with stub srun and scontrol: requeue a run a signal stopped (its marker), at most
    MAX_REQUEUES times; never one that ended with an error, which would fail again."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && { echo node1; exit 0; }\necho "$@" >> "$LOG"\n')
    (bin_ / "srun").write_text('#!/bin/bash\nwhile [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done\n'
                               'mkdir -p "$out"\ncase $OUTCOME in stopped) echo SIGTERM > "$out/stopped"; exit 1;;\n'
                               '  error) exit 1;; done) exit 0;; esac\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(tmp_path / "log"), "OUTCOME": outcome,
           "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": str(attempt), "SLURM_JOB_NODELIST": "node1",
           "SLURM_NNODES": "1"}
    p = subprocess.run(["bash", "-c", slurm_script()], cwd=tmp_path, env=env, capture_output=True, text=True)
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    assert ("requeue 4242" in log) == requeued, (p.stdout, p.stderr, log)
    assert p.returncode == (0 if outcome == "done" else 1)


def test_a_stop_leaves_the_marker_and_a_resume_removes_it(tmp_path):
    out = tmp_path / "out"
    p = launch(["--stop-at", 2], "baseline.py", *FLAGS, "--epochs", "2", "--out", out, check=False)
    assert p.returncode == 143 and (out / "stopped").read_text() == "SIGTERM\n"
    run("baseline.py", *FLAGS, "--epochs", "2", "--out", out)
    assert not (out / "stopped").exists() and (out / "final.pt").exists()


# ---------------------------------------------------------------- 5. inputs ----
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "GIF", "BMP", "JPEG"])
def test_one_pixel_limit_for_every_decoder(fmt, tmp_path, monkeypatch):
    """The same limit whatever decodes the file (torchvision.io or PIL), named in the line; under it, read."""
    monkeypatch.setattr(common, "MAX_PIXELS", 20 * 20)
    for side, ok in [(20, True), (21, False)]:
        path = tmp_path / f"{side}.{fmt.lower()}"
        Image.new("RGB", (side, side), (200, 30, 30)).save(path, fmt)
        if ok:
            assert common.read_image(str(path)).shape == (3, side, side)
        else:
            with pytest.raises(common.UserError, match=rf"21 x 21 pixels, over common.MAX_PIXELS = 400\)"):
                common.read_image(str(path))


def test_a_decompression_bomb_is_refused_unread(tmp_path):
    """The reported file: a 13,400 x 13,400 PNG (a small file, 180 MB once decoded) is refused from its header."""
    path = tmp_path / "bomb.png"
    Image.new("L", (13_400, 13_400)).save(path)
    assert path.stat().st_size < 2_000_000
    t = time.time()
    with pytest.raises(common.UserError, match=r"13400 x 13400 pixels, over common.MAX_PIXELS = 89,478,485"):
        common.read_image(str(path))
    assert time.time() - t < 1.0  # never decoded


def test_skip_bad_images_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "MAX_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    Image.new("RGB", (5, 5)).save(tmp_path / "small.png")
    files = [str(tmp_path / "big.png"), str(tmp_path / "small.png")]
    ds = common.Images(files, np.zeros(2, int), lambda img, rng: (img[None], torch.zeros(1, 7)),
                       skipped=str(tmp_path / "skipped.txt"), pool=np.arange(2))
    assert ds[(0, "s")][3] == 1  # the next image of its subset instead
    path, why = (tmp_path / "skipped.txt").read_text().strip().split("\t")
    assert path == files[0] and "over common.MAX_PIXELS = 100" in why


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux's /proc")
def test_a_workers_memory_does_not_grow_with_the_file_list():
    """pytorch/pytorch#13246: a list of 1.28M str grows every worker by its size (reference counts written
    into its pages: measured 154 MB after one pass); Images holds the names in one array (16 MB)."""
    names = [f"/data/imagenet/train/n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(1000) for i in range(1281)]

    class Touch(common.Images):
        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            return len(self.files[i])
    dl = torch.utils.data.DataLoader(Touch(names, None, None), batch_size=8192, num_workers=1, persistent_workers=True)
    it = iter(dl)
    next(it)
    private = lambda: sum(int(line.split()[1]) for line in open(f"/proc/{it._workers[0].pid}/smaps_rollup")
                          if line.startswith("Private_"))
    before = private()
    for _ in it:
        pass
    assert (private() - before) / 1024 < 40, (before, private())
