"""The baseline's ablation against a minimal reference (README, "Small images"), as it ran at 033731b.

    python tests/ablate.py --change fc,zero -- baseline.py --data data/fmnist20k --labels 10 ...

Runs a script of this repository with some of the reference's choices patched in from outside, one
name each (none: the script as it is). Each patch replaces one function of common.py:
  fc       the class head: normal init with std 0.01, zero bias (timm's; ours: PyTorch's default)
  zero     the last conv of every residual branch starts at zero (timm's zero_init_last)
  glorot   every conv and linear weight Glorot-uniform, biases zero (TensorFlow's default, so the
           authors' code)
  norm     inputs normalised by the training set's per-channel mean and std (ours: x / 127.5 - 1)
  wdall    weight decay on every parameter (ours: conv and linear weights only, the authors')
  warm     the warm-up starts at lr / 25 (ours: 0); pass --warmup for its length
  final    the cosine ends at lr / 1e4 (ours: 0)
  replace  labeled batches drawn uniformly with replacement (ours: one permutation per epoch)
What mattered, zero and norm together, became flags: --zero-init-last, and --normalize (a first layer
that standardises each channel, where norm here divides by statistics computed once).
"""
import argparse
import math
import os
import runpy
import sys

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

CHANGES = ("fc", "zero", "glorot", "norm", "wdall", "warm", "final", "replace")


def init_patch(changes):
    build = common.ResNetV2.__init__

    def __init__(self, *a, **k):
        build(self, *a, **k)
        if "glorot" in changes:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        if "fc" in changes:
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)
        if "zero" in changes:
            for b in self.blocks:
                nn.init.zeros_(b.convs[-1].weight)
    common.ResNetV2.__init__ = __init__


def norm_patch(data):
    """Per-channel mean and std of the training images (in [0, 1]), then to_input normalises by them."""
    _, files, _ = common.scan(os.path.join(data, "train"), "train/")
    s, s2, n = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for f in files:
        x = common.read_image(f).double() / 255
        s, s2, n = s + x.sum((1, 2)), s2 + (x ** 2).sum((1, 2)), n + x[0].numel()
    mean, std = s / n, (s2 / n - (s / n) ** 2).sqrt()
    print(f"ablate norm: mean {mean.tolist()}, std {std.tolist()}", flush=True)
    to_input = common.to_input

    def patched(x, hsv, device, args, color=False):
        y = to_input(x, hsv, device, args, color)  # x / 127.5 - 1, i.e. 2 u - 1 for u in [0, 1]
        m, sd = mean.float().to(y.device).view(1, 3, 1, 1), std.float().to(y.device).view(1, 3, 1, 1)
        return ((y + 1) / 2 - m) / sd
    common.to_input = patched


def schedule_patch(changes):
    def lr_at(step, steps_per_epoch, base_lr, warmup, decay_epochs, schedule="step", epochs=None):
        epoch, start = step / steps_per_epoch, base_lr / 25 if "warm" in changes else 0.0
        if epoch < warmup:
            return start + (base_lr - start) * epoch / warmup
        low = base_lr * 1e-4 if "final" in changes else 0.0
        t = min(1.0, (epoch - warmup) / max(epochs - warmup, 1e-9))
        return low + (base_lr - low) * 0.5 * (1 + math.cos(math.pi * t))
    common.lr_at = lr_at


def wdall_patch():
    common.param_groups = lambda model, wd: [{"params": [p for p in model.parameters() if p.requires_grad],
                                              "weight_decay": wd}]


def replace_patch():
    def __iter__(self):
        n, steps = len(self.indices), len(self.indices) // self.batch
        draws = np.random.default_rng([self.seed, self.stream, self.epoch, 7]).integers(0, n, (steps, self.batch))
        for s in range(self.start, steps):
            pos = range(s * self.batch + self.lo, s * self.batch + self.lo + self.b)
            yield [(int(self.indices[draws[s, p - s * self.batch]]), f"{self.seed}-{self.stream}-{self.epoch}-{p}")
                   for p in pos]
    common.EpochBatches.__iter__ = __iter__


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--change", default="", help="comma-separated names from the list above")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    changes = {c for c in a.change.split(",") if c}
    if changes - set(CHANGES):
        sys.exit(f"error: --change {a.change}: unknown {sorted(changes - set(CHANGES))} (see --help)")
    if changes & {"fc", "zero", "glorot"}:
        init_patch(changes)
    if "norm" in changes:
        norm_patch(a.args[a.args.index("--data") + 1])
    if changes & {"warm", "final"}:
        schedule_patch(changes)
    if "wdall" in changes:
        wdall_patch()
    if "replace" in changes:
        replace_patch()
    script = os.path.join(ROOT, a.script)
    sys.argv = [script, *[x for x in a.args if x != "--"]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
