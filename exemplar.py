# ALGO LOGIC: the method (this docstring is also --help)
"""S4L-Exemplar (S4L paper, Section 3.1; Table 1) and, with --labels 0, self-supervised Exemplar
(Dosovitskiy et al. 2014, as in Kolesnikov et al. 2019) for linear_eval.py.

    torchrun --nproc_per_node 8 exemplar.py --labels 10   # Table 1: 83.72% top-5
    torchrun --nproc_per_node 8 exemplar.py --labels 1    # Table 1: 47.02% top-5
    torchrun --nproc_per_node 8 exemplar.py --labels 0    # then linear_eval.py: 32.32% / 21.33%

Each step takes a labeled batch x_l and an unlabeled batch x_u of the same size; every image becomes
8 instances (Inception crop, flip, HSV colour noise), decoded once, in one forward pass. L = L_sup +
w * L_u: L_u is the batch-hard triplet loss with soft margin (Hermans et al. 2017) on L2-normalised
embeddings, mined within the x_l instances and within the x_u instances, each over the global batch
of all processes, averaged; L_sup is over x_l's 8 instances. Forked from baseline.py (and rotation).
"""
# END ALGO LOGIC
import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# ALGO LOGIC: the recipes, chosen by --labels (each entry its flag's default), and the pretext task
# The paper: batch 256, the baseline's lr and wd (Section 4.4); the released config: batch 512, a
# 10-epoch warm-up. --labels 0: Kolesnikov et al.'s schedule (lr 0.1 x batch / 256), an epoch a pass
# over all images. The colour noise is part of Exemplar at every label fraction.
RECIPES = {
    10: dict(epochs=200, batch_size=256, lr=0.1, wd=1e-3, warmup=5, decay_epochs=[140, 160, 180],
             color=True),
    1: dict(epochs=1000, batch_size=256, lr=0.01, wd=1e-2, warmup=10, decay_epochs=[700, 800, 900],
            color=True, eval_every=10),
    0: dict(epochs=35, batch_size=256, lr=lambda a: 0.1 * a.batch_size / 256, wd=1e-4, warmup=5,
            decay_epochs=[15, 25], color=True),
}
INSTANCES = 8


class Gather(torch.autograd.Function):
    """Every process's rows, in rank order. Backward: the sum over the ranks of their gradients for
    the whole batch, this rank's rows of it: a loss every rank computes on the global batch then
    trains as on one process (DDP averages the gradients)."""

    @staticmethod
    def forward(ctx, z):
        rows = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, z.contiguous())
        return torch.cat(rows)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(z):
    return Gather.apply(z) if dist.is_initialized() else z


def batch_hard_triplet(z, ids):
    """Batch hard, soft margin (Hermans et al. 2017): each instance's farthest positive (another
    instance of its image) and closest negative (an instance of another); softplus(d_pos - d_neg),
    averaged, on Euclidean distances sqrt(max(d^2, 1e-12)) of L2-normalised embeddings, in float32
    (autocast would make the distances bf16)."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        d = (2 - 2 * z @ z.T).clamp_min(1e-12).sqrt()  # |a - b|^2 = 2 - 2 a.b for unit vectors
    same = ids[:, None] == ids[None, :]
    itself = torch.eye(len(z), dtype=torch.bool, device=z.device)
    d_pos = d.masked_fill(~same | itself, -float("inf")).amax(1)
    d_neg = d.masked_fill(same, float("inf")).amin(1)
    return F.softplus(d_pos - d_neg).mean()


def L_triplet(emb, image):
    """The triplet loss of one stream's instances emb [B * 8, D] (image-major) of the images
    `image` [B] (their indices), mined over the global batch: an instance is known by its image, so
    that two copies of one image in a batch are positives. (The authors' self-supervised Exemplar,
    --labels 0 here, used a semi-hard margin-0.5 loss on squared distances; their S4L code mines
    per TPU core: we follow the paper's definition.)"""
    ids = image.to(emb.device).repeat_interleave(INSTANCES)
    return batch_hard_triplet(gather(emb), gather(ids))
# END ALGO LOGIC


def main():
    p = common.parser(__doc__)
    # ALGO LOGIC: the method's flags
    p.add_argument("--exemplar-weight", type=common.number(float, 0), default=1.0, help="w of L_u")
    p.add_argument("--embed-dim", type=common.number(int, 1), default=1000, help="embedding size")
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
    else:  # self-supervised: an epoch is a pass over all training images
        batches = common.EpochBatches(d.unlabeled, args.batch_size, args.seed, rank, world, 1)
    train = common.loader(d.files, d.labels, view, batches, args, device)
    val = common.eval_loader(d.val_files, d.val_labels, d.val_index, args, rank, world, device)

    # ---- model ----
    model = common.resnet(args, len(d.classes))
    # ALGO LOGIC: the pretext head on the pooled features
    model.emb = nn.Linear(model.num_features, args.embed_dim)
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
        stream = common.unlabeled_batches(d, d.unlabeled, view, args, rank, world, device, step)

    # ---- train ----
    for epoch in range(run.epoch, args.epochs):
        for x, hsv, y, image in run.batches(epoch):
            run.lr(step)
            x = common.to_input(x, hsv, device, args, args.color)  # [B, 3, S, S] in [-1, 1]
            y = y.to(device, non_blocking=True)
            if args.labels > 0:  # x is the labeled batch x_l; x_u an unlabeled one of the same size
                x_u, hsv_u, _, image_u = next(stream)
                x_u = common.to_input(x_u, hsv_u, device, args, args.color)
            with common.autocast(args, device):
                # ALGO LOGIC: the losses of one step (Section 3.1) and the images they showed
                if args.labels == 0:  # self-supervised Exemplar: L_u alone
                    L_u = L_triplet(net(x, heads=("emb",)), image)  # [8B, D]
                    loss, losses, images = L_u, dict(L_u=L_u), len(x)
                else:
                    logits, emb = net(torch.cat([x, x_u]), heads=("fc", "emb"))  # [8B_l + 8B_u, .]
                    L_u = (L_triplet(emb[:len(x)], image) + L_triplet(emb[len(x):], image_u)) / 2
                    L_sup = F.cross_entropy(logits[:len(x)], y.repeat_interleave(INSTANCES))
                    loss, losses = L_sup + args.exemplar_weight * L_u, dict(L_sup=L_sup, L_u=L_u)
                    images = len(logits)
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
        # ALGO LOGIC: --labels 0 has no class head to score (linear_eval.py scores its features)
        evaluate = evaluate if args.labels > 0 else dict
        # END ALGO LOGIC
        run.end_epoch(epoch, evaluate)
    run.finish()


if __name__ == "__main__":
    common.main_guard(main)
