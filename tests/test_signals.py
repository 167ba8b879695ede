"""Stop signals reach every process, in every phase (issue "Real clusters"): SLURM signals every process of
a job (DataLoader workers included), a terminal's Ctrl-C the process group, `kill` one rank. Whatever the
phase (synthetic generation, scan, training, evaluation, pseudo-labelling, between MOAM steps, saving),
the run ends within seconds with 128 + the signal and no traceback, and the same command then ends
bit-identical to a run that was never stopped."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, free_port, metrics, run, same_rows, same_weights, weights


def tree(pid):
    """pid and every process below it (DataLoader workers live in process groups of their own)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for k in kids for p in tree(int(k))]


def start(script, args, nproc, pause=None, tmp=None):
    """The script as a user starts it, through tests/launch.py where it is to hold in the phase `pause`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    program = [str(ROOT / "tests" / "launch.py"), "--pause", pause, str(tmp / "paused")] if pause else []
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    str(nproc), "--master_port", str(free_port())]
    return subprocess.Popen([*launcher, *program, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_signals)


def default_signals():
    """A test run started in the background by a shell inherits SIGINT ignored, which the scripts rightly keep
    ignored (as `nohup`): here each run starts with the dispositions of a terminal's foreground command."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(s, signal.SIG_DFL)


def wait_for(cond, p, timeout=300):
    t = time.time()
    while not cond():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() - t < timeout, "timed out waiting for the phase"
        time.sleep(0.1)


def stop(p, how, sig=signal.SIGTERM, paused=None):
    """Signal the run: its whole process tree (SLURM), its process group (a terminal), the torchrun agent alone
    (a scheduler that signals the job's main process), or one rank (the last of those that wrote their pid at
    the pause point)."""
    if how == "tree":
        for pid in tree(p.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    elif how == "group":
        os.killpg(p.pid, sig)
    elif how == "agent":  # torchrun passes it on to its workers
        os.kill(p.pid, sig)
    else:
        os.kill(int(paused.read_text().split()[-1]), sig)
    if paused is not None and paused.exists():
        time.sleep(0.5)
        paused.unlink()  # the other ranks go on from the pause point
    t = time.time()
    out, err = p.communicate(timeout=60)
    return p.returncode, time.time() - t, out + err


def no_traceback_through_our_code(text):
    """Under torchrun the launcher prints its own traceback on a signal (not ours to change): none of ours."""
    assert not re.search(rf'File "{ROOT}/\w+\.py"', text), text[-3000:]


FLAGS = [*TINY, "--labels", "10", "--epochs", "3", "--deterministic", "--log-every", "1"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Uninterrupted runs to compare with: {(script, nproc): folder}."""
    cache = {}

    def get(script, nproc, flags=FLAGS):
        key = (script, nproc, tuple(map(str, flags)))
        if key not in cache:
            out = tmp_path_factory.mktemp("whole") / script
            run(script, *flags, "--out", out, nproc=nproc)
            cache[key] = out
        return cache[key]
    return get


def resumes_exactly(script, nproc, cut, whole, flags=FLAGS):
    run(script, *flags, "--out", cut, nproc=nproc)
    assert same_weights(weights(whole / "final.pt"), weights(cut / "final.pt"))
    assert same_rows(metrics(whole), metrics(cut))


# name: (script, processes, --workers, phase to pause in (None: wait for the first row), whom to signal, signal)
CASES = {
    "training, python, workers, SIGTERM to the tree (SLURM)": ("baseline.py", 1, 2, None, "tree", signal.SIGTERM),
    "training, torchrun, workers, SIGTERM to the tree (SLURM)": ("rotation.py", 2, 2, None, "tree", signal.SIGTERM),
    "training, torchrun, workers, SIGTERM to the agent only": ("baseline.py", 2, 2, None, "agent", signal.SIGTERM),
    "evaluation, python, SIGINT to the group": ("baseline.py", 1, 0, "eval-images", "group", signal.SIGINT),
    "evaluation, torchrun, SIGTERM to one rank": ("baseline.py", 2, 0, "eval-images", "last rank", signal.SIGTERM),
    "saving, python, SIGUSR1 to the tree": ("baseline.py", 1, 0, "save", "tree", signal.SIGUSR1),
    "training, python, SIGHUP to the process": ("baseline.py", 1, 0, "train-images", "last rank", signal.SIGHUP),
}


@pytest.mark.parametrize("case", CASES)
def test_a_stopped_run_saves_and_resumes_exactly(case, tmp_path, whole):
    script, nproc, workers, pause, how, sig = CASES[case]
    flags = [*FLAGS, "--workers", workers]
    cut = tmp_path / "cut"
    if pause == "train-images":  # past the first epoch: a mid-epoch save
        run(script, *FLAGS, "--epochs", 1, "--out", cut, nproc=nproc)
    p = start(script, [*flags, "--out", cut], nproc, pause, tmp_path)
    if pause:
        wait_for(lambda: (tmp_path / "paused").exists() and len((tmp_path / "paused").read_text().split()) >= nproc, p)
    else:
        wait_for(lambda: (cut / "metrics.jsonl").exists() and metrics(cut), p)
    rc, seconds, text = stop(p, how, sig, tmp_path / "paused")
    assert seconds < 30, f"took {seconds:.0f} s to stop"
    if nproc == 1:
        assert rc == 128 + sig, text[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in text, text[-3000:]
    no_traceback_through_our_code(text)
    assert (cut / "last.pt").exists() and (cut / "stopped").read_text() == f"{signal.Signals(sig).name}\n"
    resumes_exactly(script, nproc, cut, whole(script, nproc), [*FLAGS, "--workers", workers])
    assert not (cut / "stopped").exists()  # the marker a scheduler requeues on goes with the resume


def test_stopped_while_pseudo_labelling_redoes_the_labels(tmp_path, whole, teacher):
    """Before the Run there is nothing to save: the signal ends the program at once; the re-run labels again."""
    flags = [*TINY, "--labels", "10", "--epochs", "1", "--deterministic", "--teacher", teacher / "final.pt"]
    ref = whole("pseudolabel.py", 1, flags)
    p = start("pseudolabel.py", [*flags, "--out", tmp_path / "cut"], 1, "eval-images", tmp_path)
    wait_for(lambda: (tmp_path / "paused").exists(), p)
    rc, seconds, text = stop(p, "tree")
    assert rc == 143 and seconds < 30 and not (tmp_path / "cut" / "pseudo_labels.pt").exists(), text[-2000:]
    no_traceback_through_our_code(text)
    resumes_exactly("pseudolabel.py", 1, tmp_path / "cut", ref, flags)


def test_stopped_between_moam_steps_goes_on_with_the_next(tmp_path, whole):
    flags = [*TINY, "--labels", "10", "--epochs", "1", "--deterministic", "--step", "all"]
    ref = whole("moam.py", 2, flags)
    p = start("moam.py", [*flags, "--out", tmp_path / "cut"], 2, "finished", tmp_path)
    wait_for(lambda: (tmp_path / "paused").exists() and len((tmp_path / "paused").read_text().split()) >= 2, p)
    rc, seconds, text = stop(p, "tree")
    assert seconds < 30 and "stopped by SIGTERM" in text and not (tmp_path / "cut" / "step2" / "last.pt").exists()
    no_traceback_through_our_code(text)
    run("moam.py", *flags, "--out", tmp_path / "cut", nproc=2)
    for step in ("step1", "step2", "step3"):
        assert same_weights(weights(ref / step / "final.pt"), weights(tmp_path / "cut" / step / "final.pt"))
        assert same_rows(metrics(ref / step), metrics(tmp_path / "cut" / step))


@pytest.mark.parametrize("phase,nproc", [("synthetic", 1), ("scan", 2)])
def test_stopped_before_training_leaves_nothing_half_made(phase, nproc, tmp_path):
    out = tmp_path / "cut"
    p = start("baseline.py", [*FLAGS, "--out", out], nproc, phase, tmp_path)
    wait_for(lambda: (tmp_path / "paused").exists(), p)
    rc, seconds, text = stop(p, "tree")
    assert seconds < 30 and "stopped by SIGTERM" in text, text[-2000:]
    assert nproc > 1 or rc == 143
    no_traceback_through_our_code(text)
    assert not (out / "last.pt").exists()
    made = {f.name for f in out.iterdir()} - {"hold"}  # the folder's lock, and the marker of a stop:
    assert made == ({"stopped"} if phase == "synthetic" else {"stopped", "synthetic-10x100-48px"})


def test_an_evaluation_that_fails_loses_no_training(tmp_path, whole):
    """last.pt is saved before the evaluation: fix the image, re-run, and only the evaluation is redone."""
    out = tmp_path / "cut"
    flags = [*FLAGS, "--epochs", "2"]
    run("baseline.py", *flags, "--epochs", "0", "--out", out)  # makes the synthetic data
    bad = next((out / "synthetic-10x100-48px" / "val" / "c003").iterdir())
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    p = run("baseline.py", *flags, "--out", out, check=False)
    assert p.returncode == 1 and "cannot read image" in p.stderr and str(bad) in p.stderr
    assert not (out / "metrics.jsonl").read_text().strip()
    import torch
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1000 // 10 // 32  # epoch 1 is kept
    bad.write_bytes(good)
    resumes_exactly("baseline.py", 1, out, whole("baseline.py", 1, flags), flags)
