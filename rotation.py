# ALGO LOGIC: the method (this docstring is also --help)
"""S4L-Rotation (S4L paper, Section 3.1, Eq. 2; Section 4.4) and, with --labels 0, self-supervised
Rotation (Gidaris et al. 2018, as in Kolesnikov et al. 2019) for linear_eval.py.

    torchrun --nproc_per_node 8 rotation.py --labels 10   # Table 1: 83.82% top-5
    torchrun --nproc_per_node 8 rotation.py --labels 1    # Table 1: 53.37% top-5
    torchrun --nproc_per_node 8 rotation.py --labels 0    # then linear_eval.py: 39.75% / 25.98%

Each step shows the network a labeled batch x_l and an unlabeled batch x_u of the same size, every
image in its 4 rotations (made on the GPU), in one forward pass. L = L_sup + w * L_rot: L_rot is the
rotation cross-entropy over all of them, L_sup the class cross-entropy over x_l's. From baseline.py.
"""
# END ALGO LOGIC
import argparse
import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ALGO LOGIC: the recipes, chosen by --labels (each entry its flag's default), and the pretext task
# Section 4.4: the baseline's lr and wd were also the best for S4L (the released config: lr 0.03).
# --labels 0: Kolesnikov et al.'s schedule (lr 0.1 x batch / 256), an epoch a pass over all images.
RECIPES = {
    10: dict(epochs=200, batch_size=256, lr=0.1, wd=1e-3, warmup=5, decay_epochs=[140, 160, 180]),
    1: dict(epochs=1000, batch_size=256, lr=0.01, wd=1e-2, warmup=10, decay_epochs=[700, 800, 900],
            color=True, eval_every=10),
    0: dict(epochs=35, batch_size=256, lr=lambda a: 0.1 * a.batch_size / 256, wd=1e-4, warmup=5,
            decay_epochs=[15, 25]),
}


def rotate4(x):
    """[N, C, H, W] -> [4N, C, H, W]: every image at 0, 90, 180 and 270 degrees, rotation-major:
    row i's rotation label is i // N (Eq. 2: all four rotations of every image in one step)."""
    cl = x.is_contiguous(memory_format=torch.channels_last)
    x4 = torch.cat([torch.rot90(x, r, (2, 3)) for r in range(4)])
    return x4.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def rot_labels(n, device):
    return torch.arange(4, device=device).repeat_interleave(n)


def s4l_rotation_losses(logits, rot_logits, y, B_u, rot_on_labeled=True, sup_upright_only=False):
    """On the outputs for [rotate4(x_l); rotate4(x_u)] ([4B_l + 4B_u, .]): L_rot, the mean rotation
    cross-entropy over every rotated image (Eq. 2; x_u's alone if not rot_on_labeled), and L_sup,
    the class cross-entropy over the 4 rotations of x_l (Section 4.4; upright: sup_upright_only)."""
    B_l = len(y)
    r = torch.cat([rot_labels(B_l, y.device), rot_labels(B_u, y.device)])
    first = 0 if rot_on_labeled else 4 * B_l
    L_rot = F.cross_entropy(rot_logits[first:], r[first:])
    n_sup = B_l if sup_upright_only else 4 * B_l
    L_sup = F.cross_entropy(logits[:n_sup], y.repeat(4)[:n_sup])
    return L_sup, L_rot
# END ALGO LOGIC


def main():
    p = common.parser(__doc__)
    # ALGO LOGIC: the method's flags
    p.add_argument("--rot-weight", type=common.number(float, 0), default=1.0, help="w of L_rot")
    p.add_argument("--rot-on-labeled", action=argparse.BooleanOptionalAction, default=True,
                   help="L_rot on x_l too; off also takes the labeled images out of x_u (4.4)")
    p.add_argument("--sup-upright-only", action="store_true", help="L_sup on upright x_l (4.4)")
    p.add_argument("--eval-rotations", action="store_true", help="also score the rotations' mean")
    # END ALGO LOGIC
    args = common.finish_args(p.parse_args(), RECIPES)
    rank, world, device = common.setup(args)

    # ---- data ----
    d = common.load_data(args, rank, world)
    view = functools.partial(common.train_view, size=args.img_size, crop=args.crop)
    # ALGO LOGIC: the unlabeled images (Section 4.4: --no-rot-on-labeled takes the labeled ones out)
    unlabeled = d.unlabeled if args.rot_on_labeled else np.setdiff1d(d.unlabeled, d.labeled)
    # END ALGO LOGIC
    if args.labels > 0:
        batches = common.EpochBatches(d.labeled, args.batch_size, args.seed, rank, world)
    else:  # self-supervised: an epoch is a pass over all training images
        batches = common.EpochBatches(unlabeled, args.batch_size, args.seed, rank, world, stream=1)
    train = common.loader(d.files, d.labels, view, batches, args, device)
    val = common.eval_loader(d.val_files, d.val_labels, d.val_index, args, rank, world, device)

    # ---- model ----
    model = common.resnet(args, len(d.classes))
    # ALGO LOGIC: the pretext head on the pooled features
    model.rot = nn.Linear(model.num_features, 4)
    # END ALGO LOGIC
    model.fc.requires_grad_(args.labels > 0)  # --labels 0 trains no class head
    layout = torch.channels_last if args.channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout)
    opt = torch.optim.SGD(common.param_groups(model, args.wd), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run = common.Run(args, model, opt, scaler, train, d.record, rank, world, device)
    step = run.resume()
    net = common.ddp(model, args, device, world)  # trains `model`; its backward averages gradients
    if args.labels > 0:  # x_u: the unlabeled batches, one per step, from the resumed step on
        stream = common.unlabeled_batches(d, unlabeled, view, args, rank, world, device, step)

    # ---- train ----
    for epoch in range(run.epoch, args.epochs):
        for x, hsv, y, _ in run.batches(epoch):
            run.lr(step)
            x = common.to_input(x, hsv, device, args, args.color)  # [B, 3, S, S] in [-1, 1]
            y = y.to(device, non_blocking=True)
            if args.labels > 0:  # x is the labeled batch x_l; x_u an unlabeled one of the same size
                x_u, hsv_u, _, _ = next(stream)
                x_u = common.to_input(x_u, hsv_u, device, args, args.color)
            with common.autocast(args, device):
                # ALGO LOGIC: the losses of one step (Eq. 2, Section 4.4) and the images they showed
                if args.labels == 0:  # self-supervised Rotation: L_rot alone
                    rot_logits = net(rotate4(x), heads=("rot",))
                    L_rot = F.cross_entropy(rot_logits, rot_labels(x.shape[0], device))
                    loss, losses = L_rot, dict(L_rot=L_rot)
                else:
                    x4 = torch.cat([rotate4(x), rotate4(x_u)])  # [4B_l + 4B_u, 3, S, S]
                    logits, rot_logits = net(x4, heads=("fc", "rot"))
                    L_sup, L_rot = s4l_rotation_losses(logits, rot_logits, y, len(x_u),
                                                       args.rot_on_labeled, args.sup_upright_only)
                    loss, losses = L_sup + args.rot_weight * L_rot, dict(L_sup=L_sup, L_rot=L_rot)
                images = len(rot_logits)
                # END ALGO LOGIC
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            run.log(step, images, **losses)
            run.save_or_stop()  # last.pt every --save-every minutes; a stop signal: saves, exits
            step += 1

        # ---- evaluate and save ----
        # ALGO LOGIC: what evaluation scores: upright top-1/5, rotation accuracy, rotations' mean
        def predict(x, y):
            logits, rot_logits = model(rotate4(x), heads=("fc", "rot"))
            out = {"rot_": (rot_logits, rot_labels(x.shape[0], device))}
            if args.labels > 0:
                out[""] = (logits[:x.shape[0]], y)
            if args.labels > 0 and args.eval_rotations:  # the authors average the logits
                out["rot4avg_"] = (logits.view(4, x.shape[0], -1).mean(0), y)
            return out
        # END ALGO LOGIC
        evaluate = functools.partial(common.evaluate, model, val, d, args, device, world, predict)
        run.end_epoch(epoch, evaluate)
    run.finish()


if __name__ == "__main__":
    common.main_guard(main)
