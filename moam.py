# ALGO LOGIC: the method (this docstring is also --help)
"""Mix Of All Models, MOAM (S4L paper, Section 5; Table 2), on a 4x wider ResNet50v2.

    torchrun --nproc_per_node 8 moam.py --labels 10 --step all   # Table 2: 91.23% top-5, 73.21%
    torchrun --nproc_per_node 8 moam.py --labels 100 --step 1    # with all labels: 94.97%, 80.17%

Step 1: S4L-Rotation + VAT + EntMin, L = 0.3 L_sup + 0.7 L_rot + 0.3 L_vat + 0.3 L_entmin, with
Polyak averaging (88.80% / 69.73%). Step 2: pseudo-label every image with it (5 crops x 4
rotations), train on from it (89.96% / 71.56%). Step 3: fine-tune that on the labeled subset, L_sup
alone. --step all writes the run folders OUT/step1, 2, 3; --step N writes OUT, from
OUT/../step<N-1>/final.pt or --init. Forked from baseline.py (via rotation.py), with vat.py's and
pseudolabel.py's functions.
"""
# END ALGO LOGIC
import argparse
import contextlib
import copy
import functools
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# ALGO LOGIC: the recipes of the three steps, the losses, Polyak averaging
# Section 5's recipes (step 1 keyed by --labels), batch 128 (the released step 1: lr 0.2 x batch /
# 256, the paper's 0.1); eps_vat 32 at 224 px (the authors' MOAM config), xi as in vat.py, scaled.
VAT = dict(vat_eps=lambda a: 32 * a.img_size / 224, vat_xi=lambda a: 5 * a.img_size / 224)
RECIPES = {p: dict(epochs=200, batch_size=128, lr=0.1, wd=2e-4, warmup=10,
                   decay_epochs=[100, 150, 190], **VAT) for p in (10, 100)}
STEP2 = dict(epochs=18, batch_size=128, lr=0.1, wd=2e-4, warmup=0, decay_epochs=[6, 12], **VAT)
STEP3 = dict(epochs=20, batch_size=128, lr=5e-4, wd=3e-3, warmup=0, decay_epochs=[5, 10, 15], **VAT)
W_SUP, W_ROT, W_VAT, W_ENTMIN = 0.3, 0.7, 0.3, 0.3  # as the paper states (the authors: w_rot 0.4)


# ---- copied from rotation.py ----
def rotate4(x):
    """[N, C, H, W] -> [4N, C, H, W]: every image at 0, 90, 180 and 270 degrees, rotation-major."""
    cl = x.is_contiguous(memory_format=torch.channels_last)
    x4 = torch.cat([torch.rot90(x, r, (2, 3)) for r in range(4)])
    return x4.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def rot_labels(n, device):
    return torch.arange(4, device=device).repeat_interleave(n)


# ---- copied from vat.py ----
def kl(p_logits, q_logits):
    """KL(p || q) per example, from logits, in float32."""
    p, q = F.log_softmax(p_logits.float(), 1), F.log_softmax(q_logits.float(), 1)
    return (p.exp() * (p - q)).sum(1)


def entropy(logits):
    p = F.log_softmax(logits.float(), 1)
    return -(p.exp() * p).sum(1)


def unit(d):
    return d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


@contextlib.contextmanager
def bn_stats_frozen(model):
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def r_adv(f, x, p_logits, eps, xi, iters, generator):
    d = torch.randn(x.shape, device=x.device, generator=generator)
    with torch.autocast(x.device.type, enabled=False):  # float32: x + xi d must not round back to x
        for _ in range(iters):
            d = (xi * unit(d)).requires_grad_()
            d = torch.autograd.grad(kl(p_logits, f(x + d)).sum(), d)[0]
    return eps * unit(d)


# ---- copied from pseudolabel.py ----
@torch.no_grad()
def pseudo_label(teacher, loader, args, device, tta):
    parts = []
    for x, hsv, _, idx in loader:
        x = common.to_input(x, hsv, device, args)  # [B * V, 3, S, S], V crops per image (5: tta)
        with common.autocast(args, device):
            logits = teacher(rotate4(x) if tta else x)
        p = logits.float().softmax(1).view(4 if tta else 1, len(idx), -1, logits.shape[1])
        confidence, prediction = p.mean((0, 2)).max(1)  # the mean over rotations and crops
        kept = idx >= 0  # an unreadable image left out by --skip-bad-images gets no label
        parts.append((idx[kept], prediction.cpu()[kept], confidence.cpu()[kept]))
    return tuple(torch.cat(t) for t in zip(*parts))


class Polyak:
    """Polyak averaging (Section 5) of the trainable parameters, decay 0.5 ** (1 / steps per epoch),
    zero-debiased (shadow / (1 - decay ** t)); BN running statistics from the live model."""

    def __init__(self, model, steps_per_epoch):
        self.decay, self.t = 0.5 ** (1 / steps_per_epoch), 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model):
        self.t += 1
        params = [p for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1 - self.decay)  # s <- d * s + (1 - d) * p

    def averaged(self, model):
        """The live model's state dict, each trainable parameter replaced by its debiased mean."""
        state = model.state_dict()
        for n, s in zip(self.names, self.shadow):
            state[n] = s / (1 - self.decay ** self.t) if self.t else state[n]
        return state

    def state_dict(self):
        return {"t": self.t, "shadow": self.shadow}

    def load_state_dict(self, sd):
        self.t = sd["t"]
        for s, v in zip(self.shadow, sd["shadow"]):
            s.copy_(v)


def load(model, path, n, args, record):
    """The previous step's (averaged) weights, made on this data; one line for anything else."""
    ck = common.load_checkpoint(path)
    if ck.get("method") != args.method or ck["args"].get("step") != n - 1:
        raise common.UserError(f"{path} is not a {args.method} step-{n - 1} checkpoint ("
                               f"{ck.get('method')}, step {ck['args'].get('step')}): pass one")
    common.check_data(ck, path, record, common.DATA, f"step {n} goes on from step {n - 1}'s data")
    model.load_state_dict({k: v for k, v in ck["model"].items() if k in model.state_dict()})
    return model
# END ALGO LOGIC


def run_step(n, args, d, rank, world, device):
    """One MOAM step: its recipe, its data, its losses, its own run folder."""
    prev = args.init or os.path.join(os.path.dirname(args.out), f"step{n - 1}", "final.pt")
    if rank == 0:  # the step's own folder, held while the step runs (setup holds the first's)
        common.hold(args.out)

    # ---- data ----
    labels, labeled = d.labels, d.labeled
    # ALGO LOGIC: step 2 trains on every image labeled by its pseudo label (no ground truth kept)
    if n == 2:
        path = os.path.join(args.out, "pseudo_labels.pt")
        made_by = dict(teacher=os.path.abspath(prev), images=len(d.unlabeled),
                       teacher_step=common.load_checkpoint(prev)["step"])
        if not os.path.exists(path):
            teacher = load(common.resnet(args, len(d.classes)), prev, n, args, d.record).to(device)
            labelling = common.eval_loader(d.files, d.labels, d.unlabeled, args, rank, world,
                                           device, crops=5, persistent=False)
            mine = pseudo_label(teacher.eval(), labelling, args, device, tta=True)
            parts = [mine] if world == 1 else [None] * world
            if world > 1:  # every rank's (index, label, confidence), in rank order
                dist.all_gather_object(parts, mine)
            if rank == 0:
                index, label, conf = (torch.cat(t) for t in zip(*parts))
                common.save_atomic(dict(index=index, label=label, confidence=conf, **made_by), path)
            if world > 1:
                dist.barrier()
            del teacher, labelling
        pl = torch.load(path, map_location="cpu", weights_only=True)
        if {k: pl.get(k) for k in made_by} != made_by:
            raise common.UserError(f"{path} was made from another step-1 model: remove it to "
                                   "label again")
        labels, labeled = d.labels.copy(), np.sort(pl["index"].numpy())
        labels[pl["index"].numpy()] = pl["label"].numpy()
    # END ALGO LOGIC
    view = functools.partial(common.train_view, size=args.img_size, crop=args.crop)
    batches = common.EpochBatches(labeled, args.batch_size, args.seed, rank, world)
    train = common.loader(d.files, labels, view, batches, args, device)
    val = common.eval_loader(d.val_files, d.val_labels, d.val_index, args, rank, world, device)

    # ---- model ----
    model = common.resnet(args, len(d.classes))
    # ALGO LOGIC: the rotation head, the previous step's weights, Polyak averaging (steps 1 and 2)
    model.rot = nn.Linear(model.num_features, 4)
    model.rot.requires_grad_(n < 3)  # step 3 fine-tunes the classifier alone
    if n > 1:
        load(model, prev, n, args, d.record)
    polyak = Polyak(model, batches.steps) if n < 3 else None
    # END ALGO LOGIC
    layout = torch.channels_last if args.channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout)
    opt = torch.optim.SGD(common.param_groups(model, args.wd), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    extra = {"polyak": polyak} if polyak else {}
    run = common.Run(args, model, opt, scaler, train, d.record, rank, world, device, extra)
    step = run.resume()
    average = copy.deepcopy(model) if polyak else model  # evaluated: the Polyak average's weights
    net = common.ddp(model, args, device, world)  # trains `model`; its backward averages gradients
    if n < 3:  # x_u: the unlabeled batches, one per step, from the resumed step on
        stream = common.unlabeled_batches(d, d.unlabeled, view, args, rank, world, device, step)

    # ---- train ----
    for epoch in range(run.epoch, args.epochs):
        for x, hsv, y, _ in run.batches(epoch):
            run.lr(step)
            x = common.to_input(x, hsv, device, args, args.color)  # [B, 3, S, S] in [-1, 1]
            y = y.to(device, non_blocking=True)
            if n < 3:  # x is the labeled batch x_l; x_u an unlabeled one of the same size
                x_u, hsv_u, _, _ = next(stream)
                x_u = common.to_input(x_u, hsv_u, device, args, args.color)
            with common.autocast(args, device):
                # ALGO LOGIC: the losses of one step and the images they showed the network
                if n == 3:  # fine-tuning: L_sup alone, upright images
                    L_sup = F.cross_entropy(net(x), y)
                    loss, losses, images = L_sup, dict(L_sup=L_sup), len(x)
                else:  # S4L-Rotation + VAT + EntMin on every rotated image of x_l and x_u
                    gen = common.step_generator(args.seed, step, device, stream=rank)  # r's start
                    x = torch.cat([rotate4(x), rotate4(x_u)])  # [4B_l + 4B_u, 3, S, S], one forward
                    logits, rot_logits = net(x, heads=("fc", "rot"))
                    L_sup = F.cross_entropy(logits[:4 * len(y)], y.repeat(4))
                    rot_y = torch.cat([rot_labels(len(y), device), rot_labels(len(x_u), device)])
                    L_rot = F.cross_entropy(rot_logits, rot_y)
                    first = 0 if args.vat_on_labeled else 4 * len(y)
                    x_v, p_logits = x[first:], logits[first:].detach()
                    with bn_stats_frozen(model):
                        if first:  # x_u alone: f(x_u) with the batch statistics of the VAT passes
                            with torch.no_grad():
                                p_logits = model(x_v)
                        r = r_adv(model, x_v, p_logits, args.vat_eps, args.vat_xi,
                                  args.vat_iters, gen)
                        L_vat = kl(p_logits, model(x_v + r)).mean()
                    L_entmin = entropy(logits[first:]).mean()
                    loss = W_SUP * L_sup + W_ROT * L_rot + W_VAT * L_vat + W_ENTMIN * L_entmin
                    losses = dict(L_sup=L_sup, L_rot=L_rot, L_vat=L_vat, L_entmin=L_entmin)
                    images = len(x) + 2 * len(x_v)  # the forward pass and VAT's two
                # END ALGO LOGIC
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            # ALGO LOGIC: Polyak averaging after every step
            if polyak:
                polyak.update(model)
            # END ALGO LOGIC
            run.log(step, images, **losses)
            run.save_or_stop()  # last.pt every --save-every minutes; a stop signal: saves, exits
            step += 1

        # ---- evaluate and save ----
        # ALGO LOGIC: what evaluation scores: the Polyak average (BN statistics from the live model)
        if polyak:
            average.load_state_dict(polyak.averaged(model))
        # END ALGO LOGIC
        evaluate = functools.partial(common.evaluate, average, val, d, args, device, world)
        run.end_epoch(epoch, evaluate)
    run.finish(polyak.averaged(model) if polyak else None)


def main():
    p = common.parser(__doc__)
    # ALGO LOGIC: the method's flags
    p.add_argument("--step", choices=["1", "2", "3", "all"], default="all")
    p.add_argument("--init", help="--step 2, 3: the previous step's final.pt (OUT/../step<N-1>)")
    p.add_argument("--vat-eps", type=common.number(float, 0), help="eps_vat (default: 32 at 224)")
    p.add_argument("--vat-xi", type=common.number(float, 0, strict=True), help="power-method step")
    p.add_argument("--vat-iters", type=common.number(int, 1), default=1)
    p.add_argument("--vat-on-labeled", action=argparse.BooleanOptionalAction, default=True,
                   help="L_vat and L_entmin on x_l too (default), or on x_u alone")
    p.set_defaults(width=4.0)  # "4x wider" (Kolesnikov et al.'s filters_factor 16)
    # END ALGO LOGIC
    raw = p.parse_args()
    fixed = [k for k in ("lr", "wd", "warmup", "decay_epochs") if getattr(raw, k) is not None]
    if raw.step == "all" and fixed:
        raise common.UserError(f"--{fixed[0].replace('_', '-')} with --step all would apply to all "
                               "three steps' recipes: run the steps one by one to change one")
    steps = [1, 2, 3] if raw.step == "all" else [int(raw.step)]
    for n in steps:
        recipe = RECIPES if n == 1 else {k: STEP2 if n == 2 else STEP3 for k in RECIPES}
        args = common.finish_args(copy.deepcopy(raw), recipe)
        if raw.out is None or raw.step == "all":  # default: runs/moam-labels10/step<N>
            args.out = os.path.join(args.out, f"step{n}")
        args.step, args.init = n, raw.init if raw.step != "all" else None
        if n == steps[0]:  # one set of processes and one scan of the data for every step
            rank, world, device = common.setup(args)
            d = common.load_data(args, rank, world)
        run_step(n, args, d, rank, world, device)


if __name__ == "__main__":
    common.main_guard(main)
