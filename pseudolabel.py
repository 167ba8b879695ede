# ALGO LOGIC: the method (this docstring is also --help)
"""Pseudo-Label (Lee 2013; S4L paper, Sections 3.2 and 4.2): label every training image with a
trained classifier, then train a new ResNet50v2 from scratch on the whole pseudo-labeled set.

    torchrun --nproc_per_node 8 baseline.py --labels 10
    torchrun --nproc_per_node 8 pseudolabel.py --labels 10 --teacher runs/baseline-labels10/final.pt
        # Table 1: 82.41% top-5 (--labels 1: 51.56%)

Step 1 labels every training image once over the ranks (the central crop; --tta: 5 crops x 4
rotations) into OUT/pseudo_labels.pt, which a re-run reuses; step 2 is baseline.py, forked, on them.
"""
# END ALGO LOGIC
import argparse
import functools
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common

# ALGO LOGIC: the recipes, chosen by --labels (each entry its flag's default), the teacher's labels
# Step 2: the paper's "standard practice" (Section 4.2); batch, warm-up, decays: authors' config
RECIPES = {p: dict(epochs=100, batch_size=256, lr=0.1, wd=1e-4, warmup=5, decay_epochs=[30, 60, 90])
           for p in (1, 10)}


def rotate4(x):
    """[N, C, H, W] -> [4N, C, H, W]: every image at 0, 90, 180 and 270 degrees, rotation-major."""
    cl = x.is_contiguous(memory_format=torch.channels_last)
    x4 = torch.cat([torch.rot90(x, r, (2, 3)) for r in range(4)])
    return x4.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@torch.no_grad()
def pseudo_label(teacher, loader, args, device, tta):
    """(index, label, confidence) of this rank's images: the teacher's softmax on the central
    crop, or its mean over 5 crops x 4 rotations (tta; MOAM step 2)."""
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


def training_set(pl, labels, labeled, threshold, keep_true_labels):
    """Step 2's examples and labels: the teacher's label where its confidence exceeds the
    threshold; the labeled subset keeps its ground truth (and stays in) with keep_true_labels."""
    target = np.full(len(labels), -1)
    target[pl["index"].numpy()] = pl["label"].numpy()
    keep = pl["index"][pl["confidence"] > threshold].numpy()
    if keep_true_labels:
        target[labeled] = labels[labeled]
        keep = np.union1d(keep, labeled)
    return np.sort(keep), target


def load_teacher(ck, path, n_classes, device):
    a = ck["args"]
    if a.get("labels") == 0:
        raise common.UserError(f"{path} is a self-supervised {ck.get('method')} model (--labels "
                               "0): it has no trained class head")
    teacher = common.resnet(a, n_classes)
    try:
        heads = ("stem.", "blocks.", "norm.", "fc.")
        teacher.load_state_dict({k: v for k, v in ck["model"].items() if k.startswith(heads)})
    except RuntimeError:
        raise common.UserError(f"{path} does not fit a {a['arch']} of width {a['width']:g} with "
                               f"{n_classes} classes (a checkpoint of another data set?)") from None
    return teacher.to(device).eval()
# END ALGO LOGIC


def main():
    p = common.parser(__doc__)
    # ALGO LOGIC: the method's flags
    p.add_argument("--teacher", required=True, help="a classifier's last.pt or final.pt")
    p.add_argument("--tta", action="store_true", help="label by the mean of 5 crops x 4 rotations")
    p.add_argument("--threshold", type=common.number(float, 0, 1), default=0.0,
                   help="keep predictions more confident than this (Section 4.2 tried 0.5)")
    p.add_argument("--keep-true-labels", action=argparse.BooleanOptionalAction, default=True,
                   help="the labeled subset keeps its ground truth")
    # END ALGO LOGIC
    args = common.finish_args(p.parse_args(), RECIPES)
    rank, world, device = common.setup(args)

    # ---- data ----
    d = common.load_data(args, rank, world)
    # ALGO LOGIC: step 1, the teacher labels every image (once: a re-run reads OUT/pseudo_labels.pt)
    ck = common.load_checkpoint(args.teacher)  # the student keeps its split (labeled, hold-out),
    keys = [k for k in common.DATA if k not in ("stem", "normalize", "arch", "width")]  # views
    common.check_data(ck, args.teacher, d.record, keys, "pass the teacher's data and split flags")
    path = os.path.join(args.out, "pseudo_labels.pt")
    made_by = dict(teacher=os.path.abspath(args.teacher), tta=args.tta, images=len(d.unlabeled))
    if not os.path.exists(path):
        teacher = load_teacher(ck, args.teacher, len(d.classes), device)
        labelling = common.eval_loader(d.files, d.labels, d.unlabeled, args, rank, world, device,
                                       5 if args.tta else 1, persistent=False)
        mine = pseudo_label(teacher, labelling, args, device, args.tta)
        parts = [mine] if world == 1 else [None] * world
        if world > 1:  # every rank's (index, label, confidence), in rank order
            dist.all_gather_object(parts, mine)
        if rank == 0:
            index, label, conf = (torch.cat(t) for t in zip(*parts))
            order = index.argsort()
            labels = {"index": index[order], "label": label[order], "confidence": conf[order]}
            common.save_atomic({**labels, **made_by}, path)
        if world > 1:
            dist.barrier()
        del teacher, labelling
    pl = torch.load(path, map_location="cpu", weights_only=True)
    if {k: pl.get(k) for k in made_by} != made_by:
        raise common.UserError(f"{path} was made by another teacher or data: pass another --out")
    d.labeled, d.labels = training_set(pl, d.labels, d.labeled, args.threshold,
                                       args.keep_true_labels)  # step 2's examples
    # END ALGO LOGIC
    view = functools.partial(common.train_view, size=args.img_size, crop=args.crop)
    batches = common.EpochBatches(d.labeled, args.batch_size, args.seed, rank, world)
    train = common.loader(d.files, d.labels, view, batches, args, device)
    val = common.eval_loader(d.val_files, d.val_labels, d.val_index, args, rank, world, device)

    # ---- model ----
    model = common.resnet(args, len(d.classes))
    layout = torch.channels_last if args.channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout)
    opt = torch.optim.SGD(common.param_groups(model, args.wd), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run = common.Run(args, model, opt, scaler, train, d.record, rank, world, device)
    step = run.resume()
    net = common.ddp(model, args, device, world)  # trains `model`; its backward averages gradients

    # ---- train ----
    for epoch in range(run.epoch, args.epochs):
        for x, hsv, y, _ in run.batches(epoch):
            run.lr(step)
            x = common.to_input(x, hsv, device, args, args.color)  # [B, 3, S, S] in [-1, 1]
            y = y.to(device, non_blocking=True)
            with common.autocast(args, device):
                # ALGO LOGIC: the loss of one step and the images it showed the network
                L_sup = F.cross_entropy(net(x), y)  # step 2: the pseudo-labeled batch
                loss, losses, images = L_sup, dict(L_sup=L_sup), len(x)
                # END ALGO LOGIC
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            run.log(step, images, **losses)
            run.save_or_stop()  # last.pt every --save-every minutes; a stop signal: saves, exits
            step += 1

        # ---- evaluate and save ----
        evaluate = functools.partial(common.evaluate, model, val, d, args, device, world)
        run.end_epoch(epoch, evaluate)
    run.finish()


if __name__ == "__main__":
    common.main_guard(main)
