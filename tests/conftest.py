"""Shared helpers: run a script as a user does (python or torchrun on CPU), read its outputs, and run a
function in several gloo processes."""
import atexit
import json
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A tiny model on the synthetic data: the whole suite runs on a 2-core CPU.
TINY = ["--data", "synthetic", "--arch", "resnet18", "--width", "0.25", "--img-size", "32",
        "--batch-size", "32", "--workers", "0", "--seed", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, *args, nproc=1, timeout=600, check=True, env=None, torchrun=()):
    """Run `script` with python (nproc=1) or torchrun on CPU; return the CompletedProcess. A one-process run is
    forked from this test process, which has imported torch already (~5 s saved per run, most of a tiny run);
    it gets fresh copies of the project's modules, one thread, a fresh process's signal dispositions and exit
    handlers, and its exit code as `python script.py` would give it. S4L_TEST_SUBPROCESS=1 starts a new
    interpreter for every run instead (the signal tests always do)."""
    e = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    if nproc == 1 and not torchrun and not os.environ.get("S4L_TEST_SUBPROCESS"):
        return _forked(Path(script if os.path.isabs(str(script)) else ROOT / script), list(map(str, args)), e, timeout, check)
    launch = [sys.executable, str(ROOT / script)] if nproc == 1 and not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        *(torchrun or ["--master_port", str(free_port())]), str(ROOT / script)]
    p = subprocess.run([*launch, *map(str, args)], cwd=ROOT, env={**os.environ, **e}, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def launch(hooks, script, *args, **kw):
    """run() of `script` through tests/launch.py, which patches the test hooks (--stop-at N, --nan-at N,
    --pause PHASE FILE) into common.py from outside."""
    return run("tests/launch.py", *hooks, script, *args, **kw)


def _child(script, args, env, out, err):
    """In the forked process: what a fresh `python script args` would start from, then the script."""
    sys.stdout, sys.stderr = open(out, "w", buffering=1), open(err, "w", buffering=1)
    os.dup2(sys.stdout.fileno(), 1)
    os.dup2(sys.stderr.fileno(), 2)
    os.environ.update(env)
    os.chdir(ROOT)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(False)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name, m in list(sys.modules.items()):  # the scripts and common.py, imported anew (their globals fresh)
        if os.path.dirname(getattr(m, "__file__", None) or "") in {str(ROOT), str(script.parent)}:
            del sys.modules[name]
    sys.argv, sys.path[0:0] = [str(script), *args], [str(script.parent)]
    atexit._clear()  # the test process's exit handlers are not the script's
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        atexit._run_exitfuncs()


def _forked(script, args, env, timeout, check):
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        sys.stdout.flush(), sys.stderr.flush()
        p = multiprocessing.get_context("fork").Process(target=_child, args=(script, args, env, out, err))
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired([str(script), *args], timeout)
        result = subprocess.CompletedProcess([str(script), *args], p.exitcode, open(out).read(), open(err).read())
    if check and result.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def metrics(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if line.strip()]


def same_rows(a, b):
    """metrics.jsonl rows equal but for the wall-clock throughput."""
    drop = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]
    return drop(a) == drop(b)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def last_line(p):
    lines = [l for l in (p.stderr + p.stdout).replace("\r", "\n").splitlines() if l.strip()]
    return lines[-1] if lines else ""


def _spawned(rank, world, port, fn, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def distributed(fn, world, tmp_path, *args):
    """fn(rank, world, *args) in `world` gloo processes; returns the list of their results."""
    torch.multiprocessing.start_processes(_spawned, (world, free_port(), fn, args, str(tmp_path)), nprocs=world,
                                         start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A baseline.py checkpoint (2 epochs, 2 processes) for pseudolabel.py and linear_eval.py."""
    out = tmp_path_factory.mktemp("teacher") / "baseline"
    run("baseline.py", *TINY, "--labels", "10", "--epochs", "2", "--out", out, nproc=2)
    return out
