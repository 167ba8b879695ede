"""Run a script of this repository with test hooks patched into common.py from outside (the product
has none), under python or torchrun:

    python tests/launch.py [--pause PHASE FILE] [--nan-at N] [--stop-at N] SCRIPT.py ARGS...
    torchrun --nproc_per_node 2 tests/launch.py --stop-at 4 rotation.py ARGS...

--pause PHASE FILE: at the first PHASE point, append this process's pid to FILE and hold until a stop
  signal arrives or FILE is removed (60 s at most), so that a test can signal the run in that phase:
  synthetic (generating --data synthetic), scan (after the training folder's scan), train-images and
  eval-images (decoding an image, with --workers 0), save (last.pt's temporary file written, before
  the rename), finished (after a run's final.pt).
--nan-at N: poison the weights with NaN when step N starts (a real non-finite loss follows).
--inf-buffer-at N: set the first batch-norm running variance to inf when step N starts (the losses stay
  finite: the run must refuse to save such a model).
--stop-at N: the last rank sends itself SIGTERM after step N (every rank must stop at the same step).
--free-bytes N: the disk of --out reports N bytes free (shutil.disk_usage).
"""
import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import torch  # noqa: E402


def pause_at(phase, path):
    held = []

    def pause(now):
        if now != phase or held:
            return
        held.append(now)
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        for _ in range(600):
            if common._state.signal or not os.path.exists(path):
                return
            time.sleep(0.1)
    return pause


def patch(pause=None, nan_at=None, stop_at=None, inf_buffer_at=None, free_bytes=None):
    if pause:
        encode, scan, getitem = common.write_jpeg, common.scan, common.Images.__getitem__
        save, finish = torch.save, common.Run.finish

        def write_jpeg(*a, **k):
            pause("synthetic")
            return encode(*a, **k)

        def scanned(*a, **k):
            found = scan(*a, **k)
            pause("scan")
            return found

        def __getitem__(self, item):
            pause("eval-images" if self.pool is None else "train-images")
            return getitem(self, item)

        def saved(*a, **k):
            save(*a, **k)
            pause("save")

        def finished(self, *a, **k):
            finish(self, *a, **k)
            pause("finished")
        common.write_jpeg, common.scan, common.Images.__getitem__ = write_jpeg, scanned, __getitem__
        torch.save, common.Run.finish = saved, finished
    if nan_at is not None or inf_buffer_at is not None:
        lr = common.Run.lr

        def poisoned(self, step):
            value = lr(self, step)
            with torch.no_grad():
                if step == nan_at:
                    next(self.model.parameters()).fill_(float("nan"))
                if step == inf_buffer_at:
                    next(b for n, b in self.model.named_buffers() if "running_var" in n).fill_(float("inf"))
            return value
        common.Run.lr = poisoned
    if free_bytes is not None:
        usage = common.shutil.disk_usage
        common.shutil.disk_usage = lambda path: usage(path)._replace(free=free_bytes)
    if stop_at is not None:
        log = common.Run.log

        def signalled(self, step, images, **losses):
            log(self, step, images, **losses)
            if self.step == stop_at and self.rank == self.world - 1:
                os.kill(os.getpid(), signal.SIGTERM)
        common.Run.log = signalled


def main(argv):
    hooks = {}
    while argv and not argv[0].endswith(".py"):
        flag = argv.pop(0)
        if flag == "--pause":
            hooks["pause"] = pause_at(argv.pop(0), argv.pop(0))
        elif flag in ("--nan-at", "--stop-at", "--inf-buffer-at", "--free-bytes"):
            hooks[flag[2:].replace("-", "_")] = int(argv.pop(0))
        else:
            sys.exit(f"launch.py: unknown option {flag}")
    patch(**hooks)
    script = argv[0] if os.path.isabs(argv[0]) else os.path.join(ROOT, argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
