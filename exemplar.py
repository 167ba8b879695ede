# ALGO LOGIC: the method (this docstring is also --help)
"""S4L-Exemplar (S4L paper, Section 3.1; Table 1) and, with --labels 0, self-supervised Exemplar
(Dosovitskiy et al. 2014, as in Kolesnikov et al. 2019) for linear_eval.py.

    torchrun --nproc_per_node 8 exemplar.py --labels 10   # paper (Table 1): 83.72% top-5
    torchrun --nproc_per_node 8 exemplar.py --labels 1    # paper (Table 1): 47.02% top-5
    torchrun --nproc_per_node 8 exemplar.py --labels 0    # then linear_eval.py: 32.32% / 21.33% top-5

Each step takes a labeled batch x_l and an unlabeled batch x_u of the same size; every image becomes 8
instances (Inception crop, horizontal flip, HSV colour noise), decoded once, in one forward pass.
L = L_sup + w * L_u: L_u is the batch-hard triplet loss with soft margin (Hermans et al. 2017) on the
L2-normalised embeddings, mined within the x_l instances and within the x_u instances, each over the
global batch of all processes, averaged; L_sup is over all 8 instances of x_l. Forked from baseline.py
(via rotation.py).
"""
# END ALGO LOGIC
import functools

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn as nn
import torch.nn.functional as F

import common

# ALGO LOGIC: the recipes, chosen by --labels (each entry the default of its flag), and the pretext task
# The paper: batch 256
# and the baseline's learning rate and weight decay (Section 4.4); the released S4L-Exemplar config uses
# batch 512 and a 10-epoch warm-up. --labels 0: Kolesnikov et al.'s schedule (lr 0.1 x batch / 256), an
# epoch being a pass over all images. The colour noise is part of Exemplar at every label fraction.
RECIPES = {
    10: dict(epochs=200, batch_size=256, lr=0.1, wd=1e-3, warmup=5, decay_epochs=[140, 160, 180], color=True),
    1: dict(epochs=1000, batch_size=256, lr=0.01, wd=1e-2, warmup=10, decay_epochs=[700, 800, 900], color=True,
            eval_every=10),
    0: dict(epochs=35, batch_size=256, lr=lambda a: 0.1 * a.batch_size / 256, wd=1e-4, warmup=5, decay_epochs=[15, 25],
            color=True),
}
INSTANCES = 8


def gather(z):
    """Every process's rows, in rank order; differentiable: the backward sums each rank's gradient
    into its own rows, so a loss that every rank computes on the whole batch trains like one process."""
    return torch.cat(torch.distributed.nn.functional.all_gather(z)) if dist.is_initialized() else z


def batch_hard_triplet(z, ids):
    """Batch hard, soft margin (Hermans et al. 2017): for each instance its farthest positive (another
    instance of the same image) and closest negative (an instance of another image); softplus(d_pos -
    d_neg), averaged. Euclidean distances, sqrt(max(d^2, 1e-12)), between L2-normalised embeddings."""
    z = F.normalize(z.float(), dim=1)
    d = (2 - 2 * z @ z.T).clamp_min(1e-12).sqrt()  # |a - b|^2 = 2 - 2 a.b for unit vectors
    same = ids[:, None] == ids[None, :]
    d_pos = d.masked_fill(~same | torch.eye(len(z), dtype=torch.bool, device=z.device), -float("inf")).amax(1)
    d_neg = d.masked_fill(same, float("inf")).amin(1)
    return F.softplus(d_pos - d_neg).mean()


def L_triplet(emb):
    """The triplet loss of one stream's instances [B * 8, D] (image-major), mined over the global batch.
    (The authors' self-supervised Exemplar, --labels 0 here, used a semi-hard margin-0.5 loss on squared
    distances; the authors' S4L code mines per TPU core: we follow the paper's definition.)"""
    z = gather(emb)
    return batch_hard_triplet(z, torch.arange(len(z) // INSTANCES, device=z.device).repeat_interleave(INSTANCES))
# END ALGO LOGIC


def main():
    p = common.parser(__doc__)
    # ALGO LOGIC: the method's flags
    p.add_argument("--exemplar-weight", type=common.number(float, 0), default=1.0, help="w of L_u (Section 4.4: 1)")
    p.add_argument("--embed-dim", type=common.number(int, 1), default=1000, help="size of the embedding head (the authors': 1000)")
    # END ALGO LOGIC
    args = common.finish_args(p.parse_args(), RECIPES)
    rank, world, device = common.setup(args)

    # ---- data ----
    d = common.load_data(args, rank, world)
    # ALGO LOGIC: the training views: 8 instances of every image, from one decode
    view = functools.partial(common.train_view, size=args.img_size, n=INSTANCES, crop=args.crop)
    # END ALGO LOGIC
    if args.labels > 0:
        batches = common.EpochBatches(d.labeled, args.batch_size, args.seed, rank, world)
        stream = common.StreamBatches(d.unlabeled, args.batch_size, args.seed, rank, world, stream=1)
        train_u = common.loader(d.files, d.labels, view, stream, args, device)  # its labels are never used
    else:  # self-supervised: an epoch is a pass over all training images
        batches = common.EpochBatches(d.unlabeled, args.batch_size, args.seed, rank, world, stream=1)
    train = common.loader(d.files, d.labels, view, batches, args, device)
    val = common.eval_loader(d.val_files, d.val_labels, d.val_index, args, rank, world, device)

    # ---- model ----
    model = common.resnet(args, len(d.classes))
    # ALGO LOGIC: the pretext head on the pooled features
    model.emb = nn.Linear(model.num_features, args.embed_dim)
    # END ALGO LOGIC
    model.fc.requires_grad_(args.labels > 0)  # --labels 0 trains no class head
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    opt = torch.optim.SGD(common.param_groups(model, args.wd), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    run = common.Run(args, model, opt, scaler, len(batches.indices) // args.batch_size, rank, world, device)
    step = run.resume()
    fast, net = common.wrap(model, args, device, world)
    if args.labels > 0:
        stream.start = step  # the unlabeled stream resumes where it stopped: one batch per step
        unlabeled_batches = iter(train_u)

    # ---- train ----
    for epoch in range(run.epoch, args.epochs):
        batches.set_epoch(epoch, step - epoch * run.spe)
        for x, hsv, y, _ in run.progress(train, epoch):
            run.lr(step)
            x, y = common.to_input(x, hsv, device, args, args.color), y.to(device, non_blocking=True)
            if args.labels > 0:  # x is the labeled batch x_l; x_u the unlabeled batch of the same size
                x_u, hsv_u, _, _ = next(unlabeled_batches)
                x_u = common.to_input(x_u, hsv_u, device, args, args.color)
            with common.autocast(args, device):
                # ALGO LOGIC: the losses of one step (Section 3.1) and the images they showed the network
                if args.labels == 0:  # self-supervised Exemplar: L_u alone
                    L_u = L_triplet(net(x, heads=("emb",)))  # [8B, D]
                    loss, losses, images = L_u, dict(L_u=L_u), len(x)
                else:
                    logits, emb = net(torch.cat([x, x_u]), heads=("fc", "emb"))  # [8B_l + 8B_u, .]
                    L_u = (L_triplet(emb[:len(x)]) + L_triplet(emb[len(x):])) / 2  # mined within x_l, within x_u
                    L_sup = F.cross_entropy(logits[:len(x)], y.repeat_interleave(INSTANCES))  # all 8 instances
                    loss, losses, images = L_sup + args.exemplar_weight * L_u, dict(L_sup=L_sup, L_u=L_u), len(logits)
                # END ALGO LOGIC
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            run.track(step, images, **losses)
            step += 1

        # ---- evaluate and save ----
        # ALGO LOGIC: what evaluation scores: the class head (--labels 0: none; linear_eval.py scores the features)
        evaluate = functools.partial(common.evaluate, fast, val, d, args, device, world) if args.labels > 0 else dict
        # END ALGO LOGIC
        run.end_epoch(epoch, evaluate)
    run.finish()


if __name__ == "__main__":
    common.main_guard(main)
