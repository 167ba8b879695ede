"""Shared helpers: run a script as a user does (python or torchrun on CPU), read its outputs, and run a
function in several gloo processes."""
import json
import os
import socket
import subprocess
import sys
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
    """Run `script` with python (nproc=1) or torchrun on CPU; return the CompletedProcess."""
    launch = [sys.executable, str(ROOT / script)] if nproc == 1 and not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        *(torchrun or ["--master_port", str(free_port())]), str(ROOT / script)]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    p = subprocess.run([*launch, *map(str, args)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


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
