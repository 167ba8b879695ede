"""How good is VAT's adversarial direction, by xi and by the precision of the power-iteration pass?
(A measurement script, not collected by pytest; tests/test_vat.py uses its `ratio`.)

A ResNetV2 is trained briefly at 224 px on synthetic images (random-init networks have no adversarial
structure at eps 40: every direction is as bad as any other). Then, for a batch of validation images,
the clean prediction is made as in training (autocast precision, batch statistics), r_adv is found by
vat.r_adv, and the KL along r_adv is compared with the KL along random directions of the same norm eps.
SPEC asks for a ratio of at least 2.

    python tests/vat_xi.py                     # CPU: ResNet-18v2, 224 px
    python tests/vat_xi.py --arch 50 --device cuda
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import vat  # noqa: E402


def trained_resnet(depth, width, size, steps, device, root, seed=0):
    """A ResNetV2 after `steps` SGD steps (batch 16) on the synthetic classes at `size` px."""
    torch.manual_seed(seed)
    root = common.make_synthetic(root, 10, 100, 48)
    _, files, labels = common.scan(root + "/train", "train")
    model = common.ResNetV2(depth, width, 10).to(device).train()
    opt = torch.optim.SGD(common.param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    rng = random.Random(seed)
    for _ in range(steps):
        idx = [rng.randrange(len(files)) for _ in range(16)]
        x = torch.cat([common.train_view(common.read_image(files[i]), rng, size)[0] for i in idx]).to(device)
        loss = F.cross_entropy(model(x.float() / 127.5 - 1), torch.as_tensor(labels[idx], device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, vfiles, _ = common.scan(root + "/val", "val")
    x = torch.cat([common.eval_view(common.read_image(vfiles[i]), None, size)[0] for i in range(0, 200, 25)])
    return model, x.to(device).float() / 127.5 - 1


def ratio(model, x, eps, xi, clean_dtype=None, pi_dtype=None, seed=0):
    """KL(f(x) || f(x + r_adv)) / mean KL along 3 random directions of norm eps. clean_dtype: the autocast
    of the training forward (None: float32); pi_dtype: of the power iteration (None: as vat.py, float32)."""
    g = torch.Generator(x.device).manual_seed(seed)
    ac = lambda dt: torch.autocast(x.device.type, dtype=dt or torch.float32, enabled=dt is not None)
    with vat.bn_stats_frozen(model), ac(clean_dtype):
        p = model(x).detach()
        if pi_dtype is None:
            r = vat.r_adv(model, x, p, eps, xi, 1, g)
        else:  # the same power iteration, in another precision, for the table
            d = (xi * vat.unit(torch.randn(x.shape, device=x.device, generator=g))).requires_grad_()
            with ac(pi_dtype):
                r = eps * vat.unit(torch.autograd.grad(vat.kl(p, model(x + d)).sum(), d)[0])
        with torch.no_grad():
            adv = vat.kl(p, model(x + r)).mean().item()
            rnd = sum(vat.kl(p, model(x + eps * vat.unit(torch.randn(x.shape, device=x.device, generator=g)))).mean().item()
                      for _ in range(3)) / 3
    return adv / max(rnd, 1e-30)


if __name__ == "__main__":
    a = argparse.ArgumentParser()
    a.add_argument("--arch", type=int, default=18)
    a.add_argument("--size", type=int, default=224)
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--device", default="cpu")
    a.add_argument("--root", default="/tmp/vat_xi_synthetic")
    args = a.parse_args()
    t = time.time()
    model, x = trained_resnet(args.arch, 1.0, args.size, args.steps, torch.device(args.device), args.root)
    eps = 40 * args.size / 224
    print(f"ResNet-{args.arch}v2 at {args.size} px after {args.steps} steps ({time.time() - t:.0f} s), eps {eps:g}, "
          f"{args.device}: KL along r_adv / KL along a random direction")
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    cases = [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32 (vat.py)"), ("float16", "float16")]
    xis = [1e-6, 1e-3, 1e-1, 1.0, 5.0 * args.size / 224, 20.0]
    print(f"{'training forward':>17} {'power iteration':>17} " + " ".join(f"{'xi=' + format(v, 'g'):>9}" for v in xis))
    for clean, pi in cases:
        row = [ratio(model, x, eps, xi, dtypes[clean], None if "vat.py" in pi else dtypes[pi]) for xi in xis]
        print(f"{clean:>17} {pi:>17} " + " ".join(f"{v:9.2f}" for v in row), flush=True)
