# ALGO LOGIC: the method (this docstring is also --help)
"""Pseudo-Label (Lee 2013; S4L paper, Sections 3.2 and 4.2): label every training image with a trained
classifier, then train a new ResNet50v2 from scratch on the whole pseudo-labeled set.

    torchrun --nproc_per_node 8 baseline.py --labels 10
    torchrun --nproc_per_node 8 pseudolabel.py --labels 10 --teacher runs/baseline-labels10/final.pt
        # Table 1: 82.41% top-5 (--labels 1: 51.56%)

Step 1 predicts every training image once over the ranks (the central crop; --tta averages 5 crops x 4
rotations) and saves OUT/pseudo_labels.pt; a re-run finds the file and skips step 1. Step 2 is
baseline.py's training on the pseudo-labeled set. Forked from baseline.py.
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

# ALGO LOGIC: the recipes, chosen by --labels (each entry the default of its flag), and the teacher's labels
# Step 2, the paper's "standard practice" (Section 4.2): lr 0.1, wd 1e-4, 100 epochs over the full set;
# batch, warm-up and decays from the authors' config. --labels picks the teacher's labeled subset.
RECIPES = {p: dict(epochs=100, batch_size=256, lr=0.1, wd=1e-4, warmup=5, decay_epochs=[30, 60, 90], color=False)
           for p in (1, 10)}


def rotate4(x):
    """[N, C, H, W] -> [4N, C, H, W]: every image at 0, 90, 180 and 270 degrees, rotation-major."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.cat([torch.rot90(x, r, (2, 3)) for r in range(4)]).contiguous(memory_format=fmt)


@torch.no_grad()
def pseudo_label(teacher, loader, args, device, tta):
    """(index, label, confidence) of this rank's images: the teacher's softmax on the central crop, or
    its mean over 5 crops x 4 rotations (tta; MOAM step 2)."""
    index, label, conf = [], [], []
    for x, hsv, _, idx in loader:
        x = common.to_input(x, hsv, device, args)  # [B * V, 3, S, S], V = 5 crops with tta, image-major
        with common.autocast(args, device):
            logits = teacher(rotate4(x) if tta else x)
        p = logits.float().softmax(1).view(4 if tta else 1, len(idx), -1, logits.shape[1]).mean((0, 2))
        c, l = p.max(1)
        ok = idx >= 0  # an unreadable image left out by --skip-bad-images gets no label
        index.append(idx[ok]), label.append(l.cpu()[ok]), conf.append(c.cpu()[ok])
    return torch.cat(index), torch.cat(label), torch.cat(conf)


def training_set(pl, labels, labeled, threshold, keep_true_labels):
    """Step 2's examples and labels: the teacher's label where its confidence exceeds the threshold;
    the labeled subset keeps its ground truth (and stays in) with keep_true_labels."""
    target = np.full(len(labels), -1)
    target[pl["index"].numpy()] = pl["label"].numpy()
    keep = pl["index"][pl["confidence"] > threshold].numpy()
    if keep_true_labels:
        target[labeled] = labels[labeled]
        keep = np.union1d(keep, labeled)
    return np.sort(keep), target


def load_teacher(path, n_classes, device):
    ck = common.load_checkpoint(path)
    a = ck["args"]
    if a.get("labels") == 0:
        raise common.UserError(f"{path} is a self-supervised {ck.get('method')} model (--labels 0): it has no trained class head")
    teacher = common.resnet(a, n_classes)
    try:
        teacher.load_state_dict({k: v for k, v in ck["model"].items() if k.startswith(("stem.", "blocks.", "norm.", "fc."))})
    except RuntimeError:
        raise common.UserError(f"{path} does not fit a {a['arch']} of width {a['width']:g} with {n_classes} classes "
                               "(a checkpoint of another data set?)") from None
    return teacher.to(device).eval()
# END ALGO LOGIC


def main():
    p = common.parser(__doc__)
    # ALGO LOGIC: the method's flags
    p.add_argument("--teacher", required=True, help="a classifier's last.pt or final.pt (e.g. baseline.py's)")
    p.add_argument("--tta", action="store_true", help="label by the mean of 5 crops x 4 rotations")
    p.add_argument("--threshold", type=common.number(float, 0, 1), default=0.0, help="keep predictions more confident "
                   "than this (Section 4.2 tried 0.5; default: keep all)")
    p.add_argument("--keep-true-labels", action=argparse.BooleanOptionalAction, default=True,
                   help="the labeled subset keeps its ground truth")
    # END ALGO LOGIC
    args = common.finish_args(p.parse_args(), RECIPES)
    rank, world, device = common.setup(args)

    # ---- data ----
    d = common.load_data(args, rank, world)
    # ALGO LOGIC: step 1, the teacher labels every image (once: a re-run reads OUT/pseudo_labels.pt)
    teacher_args = common.load_checkpoint(args.teacher)["args"]
    differ = [k for k in ("labels", "split_file", "split_seed", "val_split", "val_size") if teacher_args.get(k) != getattr(args, k)]
    if differ:  # the student must keep the teacher's labeled subset and never train on its hold-out
        k = differ[0]
        show = lambda v: f"{v:g}" if isinstance(v, float) else v
        raise common.UserError(f"the teacher was trained with --{k.replace('_', '-')} {show(teacher_args.get(k))}, not "
                               f"{show(getattr(args, k))}: pass the teacher's split arguments")
    path = os.path.join(args.out, "pseudo_labels.pt")
    made_by = {"teacher": os.path.abspath(args.teacher), "tta": args.tta, "images": len(d.unlabeled)}
    if not os.path.exists(path):
        teacher = load_teacher(args.teacher, len(d.classes), device)
        labelling = common.eval_loader(d.files, d.labels, d.unlabeled, args, rank, world, device, 5 if args.tta else 1, False)
        mine = pseudo_label(teacher, labelling, args, device, args.tta)
        parts = [mine] if world == 1 else [None] * world
        if world > 1:  # every rank's (index, label, confidence), in rank order
            dist.all_gather_object(parts, mine)
        if rank == 0:
            index, label, conf = (torch.cat(t) for t in zip(*parts))
            order = index.argsort()
            common.save_atomic({"index": index[order], "label": label[order], "confidence": conf[order], **made_by}, path)
        if world > 1:
            dist.barrier()
        del teacher, labelling
    pl = torch.load(path, map_location="cpu", weights_only=True)
    if {k: pl.get(k) for k in made_by} != made_by:
        raise common.UserError(f"{path} was made by another teacher or data ({ {k: pl.get(k) for k in made_by} }): pass another --out")
    d.labeled, d.labels = training_set(pl, d.labels, d.labeled, args.threshold, args.keep_true_labels)  # step 2's examples
    # END ALGO LOGIC
    view = functools.partial(common.train_view, size=args.img_size, crop=args.crop)
    batches = common.EpochBatches(d.labeled, args.batch_size, args.seed, rank, world)
    train = common.loader(d.files, d.labels, view, batches, args, device)
    val = common.eval_loader(d.val_files, d.val_labels, d.val_index, args, rank, world, device)

    # ---- model ----
    model = common.resnet(args, len(d.classes))
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    opt = torch.optim.SGD(common.param_groups(model, args.wd), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run = common.Run(args, model, opt, scaler, len(batches.indices) // args.batch_size, rank, world, device)
    step = run.resume()
    fast, net = common.wrap(model, args, device, world)

    # ---- train ----
    for epoch in range(run.epoch, args.epochs):
        batches.set_epoch(epoch, step - epoch * run.spe)
        for x, hsv, y, _ in run.progress(train, epoch):
            run.lr(step)
            x, y = common.to_input(x, hsv, device, args, args.color), y.to(device, non_blocking=True)
            with common.autocast(args, device):
                # ALGO LOGIC: the loss of one step and the images it showed the network
                L_sup = F.cross_entropy(net(x), y)  # step 2: the pseudo-labeled batch
                loss, losses, images = L_sup, dict(L_sup=L_sup), len(x)
                # END ALGO LOGIC
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            run.track(step, images, **losses)
            step += 1

        # ---- evaluate and save ----
        run.end_epoch(epoch, functools.partial(common.evaluate, fast, val, d, args, device, world))
    run.finish()


if __name__ == "__main__":
    common.main_guard(main)
