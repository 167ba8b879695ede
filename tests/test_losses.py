"""Independent reference tests for the losses and helpers of the S4L scripts.

Every reference below is written from the definitions in the paper / SPEC.md ("What the paper
leaves open") and the cited papers (Hermans et al. 2017 batch-hard triplet; Miyato et al. 2018
VAT), never from the implementations under test: brute-force python loops, hand-computed values,
Python's colorsys, closed-form Hessians, explicit index arithmetic.

Run: cd /work/main && python -m pytest -q tests/test_losses.py
"""
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import colorsys
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import common
import exemplar
import moam
import rotation
import vat

# moam.py carries its own copies of the VAT helpers and of rotate4/rot_labels: test every copy.
VAT_MODULES = [pytest.param(vat, id="vat"), pytest.param(moam, id="moam")]
ROT_MODULES = [pytest.param(rotation, id="rotation"), pytest.param(moam, id="moam")]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# 1-2. Exemplar: batch-hard triplet loss with soft margin (Hermans, Beyer, Leibe 2017)
# --------------------------------------------------------------------------------------------

def triplet_reference(z, ids):
    """Brute-force O(n^2) batch-hard soft-margin triplet loss, float64, python loops.

    Built from scalar torch ops so that autograd gives the reference gradient too."""
    z = z.double()
    n = z.shape[0]
    ids = [int(i) for i in ids]
    zn = [z[i] / torch.sqrt((z[i] * z[i]).sum()) for i in range(n)]
    def d(a, b):
        diff = zn[a] - zn[b]
        return torch.sqrt(torch.clamp((diff * diff).sum(), min=1e-12))
    total = 0.0
    for i in range(n):
        pos = [d(i, j) for j in range(n) if j != i and ids[j] == ids[i]]
        neg = [d(i, j) for j in range(n) if ids[j] != ids[i]]
        d_pos = pos[0]
        for v in pos[1:]:
            d_pos = torch.maximum(d_pos, v)
        d_neg = neg[0]
        for v in neg[1:]:
            d_neg = torch.minimum(d_neg, v)
        total = total + F.softplus(d_pos - d_neg)
    return total / n


def _value_and_grad(fn, z, *args):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, *args)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach().double(), g.double()


def _assert_grad_close(g, ref, rel=1e-5):
    """Elementwise closeness with an absolute floor at rel * the largest reference entry."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(g, ref, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_hard_triplet_matches_bruteforce(dtype):
    """batch_hard_triplet value and dL/dz equal a brute-force float64 loop reference (4 images x 8)."""
    torch.manual_seed(0)
    z = torch.randn(32, 16, generator=gen(1), dtype=torch.float64).to(dtype)
    ids = torch.arange(4).repeat_interleave(8)
    loss, g = _value_and_grad(exemplar.batch_hard_triplet, z, ids)
    ref_loss, ref_g = _value_and_grad(triplet_reference, z.double(), ids)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grad_close(g, ref_g)


def test_batch_hard_triplet_shuffled_ids_uneven_groups_unnormalized_scale():
    """Brute-force reference with shuffled rows, groups of different sizes, rows of very different norms."""
    g0 = gen(2)
    ids = torch.tensor([0] * 3 + [1] * 5 + [2] * 2 + [3] * 6 + [7] * 4)
    perm = torch.randperm(len(ids), generator=g0)
    ids = ids[perm]
    z = torch.randn(len(ids), 12, generator=g0, dtype=torch.float64)
    z = z * torch.exp(2 * torch.randn(len(ids), 1, generator=g0, dtype=torch.float64))  # row norms ~e^{+-4}
    loss, g = _value_and_grad(exemplar.batch_hard_triplet, z, ids)
    ref_loss, ref_g = _value_and_grad(triplet_reference, z, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grad_close(g, ref_g)


def test_batch_hard_triplet_is_scale_invariant_per_row():
    """Reference property of L2 normalisation: scaling any row by a positive factor changes nothing."""
    z = torch.randn(16, 8, generator=gen(3), dtype=torch.float64)
    ids = torch.arange(4).repeat_interleave(4)
    s = torch.rand(16, 1, generator=gen(4), dtype=torch.float64) * 10 + 0.1
    a = exemplar.batch_hard_triplet(z, ids).double()
    b = exemplar.batch_hard_triplet(z * s, ids).double()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_batch_hard_triplet_identical_instances_clamped_and_finite():
    """Identical positives: d_pos = sqrt(max(0, 1e-12)) = 1e-6, loss matches the reference, gradients finite."""
    g0 = gen(5)
    base = torch.randn(3, 8, generator=g0, dtype=torch.float64)
    z = base.repeat_interleave(2, dim=0)  # 3 images x 2 identical instances
    ids = torch.arange(3).repeat_interleave(2)
    loss, g = _value_and_grad(exemplar.batch_hard_triplet, z, ids)
    ref_loss = triplet_reference(z, ids)
    # In float32, a distance of exactly 0 may be computed as sqrt(2 - 2 cos) with cos rounded,
    # i.e. up to sqrt(float32 eps) ~ 3.5e-4 instead of 1e-6; allow that (and nothing more).
    assert abs(loss.item() - ref_loss.item()) < 1e-3
    assert torch.isfinite(g).all()


def _image_ids(b, k=8):
    return torch.arange(b).repeat_interleave(k)


def test_L_triplet_single_process_equals_batch_hard_triplet():
    """Without torch.distributed, L_triplet(emb, images) == batch_hard_triplet(emb, images.repeat_interleave(8))."""
    assert not (dist.is_available() and dist.is_initialized())
    emb = torch.randn(5 * 8, 16, generator=gen(6))
    l1, g1 = _value_and_grad(lambda e: exemplar.L_triplet(e, torch.arange(5)), emb)
    l2, g2 = _value_and_grad(exemplar.batch_hard_triplet, emb, _image_ids(5))
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)
    # and both agree with the brute-force reference
    torch.testing.assert_close(l1, triplet_reference(emb, _image_ids(5)).detach(), rtol=1e-5, atol=0)


def test_L_triplet_knows_an_instance_by_its_image():
    """The unlabeled stream may hold one image twice in a batch (a batch that straddles two cycles):
    its copies are positives of each other, never each other's hardest negatives (brute force)."""
    emb = torch.randn(4 * 8, 16, generator=gen(11))
    image = torch.tensor([7, 3, 7, 9])  # image 7 twice
    loss = exemplar.L_triplet(emb, image)
    by_image = triplet_reference(emb, image.repeat_interleave(8))
    by_position = triplet_reference(emb, torch.arange(4).repeat_interleave(8))
    torch.testing.assert_close(loss.double(), by_image.detach(), rtol=1e-5, atol=0)
    assert abs(by_image.item() - by_position.item()) > 1e-3


def test_the_unlabeled_stream_repeats_images_in_a_batch():
    """1,000 images in batches of 256 (the issue's case): about a quarter of the stream's batches hold an image
    twice (98 of 400 reported); L_triplet on such a batch pairs the copies as one image's instances."""
    import numpy as np
    import common
    stream = iter(common.StreamBatches(np.arange(1000), 256, 0, 0, 1, stream=1))
    batches = [next(stream) for _ in range(400)]
    repeated = [b for b in batches if len({i for i, _ in b}) < len(b)]
    assert 50 < len(repeated) < 150, len(repeated)
    image = torch.tensor([i for i, _ in repeated[0]])
    emb = torch.randn(len(image) * 8, 4, generator=gen(12))
    by_image = exemplar.batch_hard_triplet(emb, image.repeat_interleave(8))
    by_position = exemplar.batch_hard_triplet(emb, torch.arange(len(image)).repeat_interleave(8))
    assert torch.equal(exemplar.L_triplet(emb, image), by_image) and not torch.equal(by_image, by_position)


def test_batch_hard_triplet_is_float32_under_bf16_autocast():
    """The mining's distances in float32 whatever the autocast (the issue: 1.0547 in bf16 against 1.0559):
    under bf16 autocast the loss is bit for bit the float32 one, where a matrix product would be bf16."""
    z = torch.randn(32 * 8, 64, generator=gen(13))
    ids = torch.arange(32).repeat_interleave(8)
    want = exemplar.batch_hard_triplet(z, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z @ z.T).dtype == torch.bfloat16  # what the mining would have used
        got = exemplar.batch_hard_triplet(z, ids)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    torch.testing.assert_close(want.double(), triplet_reference(z, ids).detach(), rtol=1e-5, atol=0)


def _dist_worker(rank, world, init_file, emb_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        emb = torch.load(emb_file, weights_only=True)
        n = emb.shape[0] // world
        local = emb[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        with warnings.catch_warnings():  # the gather is a supported collective: no deprecation
            warnings.simplefilter("error")
            loss = exemplar.L_triplet(local, torch.arange(rank * n // 8, (rank + 1) * n // 8))
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_L_triplet_two_processes_global_batch(tmp_path):
    """gloo, 2 processes: every rank's L_triplet equals the 1-process loss on the full batch; own-row grads = 2x."""
    world, images = 2, 6  # 3 whole images (24 rows) per rank
    emb = torch.randn(images * 8, 16, generator=gen(7))
    torch.save(emb, tmp_path / "emb.pt")
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "store"), str(tmp_path / "emb.pt"), str(tmp_path)),
             nprocs=world, join=True)
    full_loss, full_grad = _value_and_grad(lambda e: exemplar.L_triplet(e, torch.arange(images)), emb)
    n = emb.shape[0] // world
    for r in range(world):
        out = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(out["loss"].double(), full_loss, rtol=1e-6, atol=0)
        # The differentiable all_gather's backward SUMS over ranks the gradients of every rank's
        # loss w.r.t. this rank's rows. Every rank computes the same global loss L, so rank r
        # receives world * dL/d(rows of r). DDP then averages (sums and divides by world) the
        # parameter gradients: (1/world) * sum_r world * dL/d(rows_r) * d(rows_r)/d(theta)
        # = dL/d(theta), the gradient of the global-batch loss, exactly as in one process with
        # the whole batch. (Had each rank received only 1x, DDP would scale the triplet
        # gradient down by the number of processes.)
        torch.testing.assert_close(out["grad"].double(), world * full_grad[r * n:(r + 1) * n],
                                   rtol=1e-5, atol=1e-5 * full_grad.abs().max().item())


# --------------------------------------------------------------------------------------------
# 3-7. VAT helpers (Miyato et al. 2018)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", VAT_MODULES)
def test_kl_hand_computed_two_class(m):
    """KL((1/2,1/2) || (1/4,3/4)) = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3), by hand; and 0 for p == q."""
    p = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    q = torch.tensor([[0.0, math.log(3.0)], [1.0, -2.0]])
    out = m.kl(p, q)
    assert out.shape == (2,)
    torch.testing.assert_close(out.double(), torch.tensor([0.5 * math.log(4 / 3), 0.0], dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("m", VAT_MODULES)
def test_kl_matches_explicit_sum_and_direction(m):
    """kl(p, q) = sum_k p_k (log p_k - log q_k) with explicit float64 sums and torch.distributions; KL(p||q) != KL(q||p)."""
    g0 = gen(8)
    a = torch.randn(20, 7, generator=g0, dtype=torch.float64) * 2
    b = torch.randn(20, 7, generator=g0, dtype=torch.float64) * 2
    pa, pb = torch.softmax(a, 1), torch.softmax(b, 1)
    ref = (pa * (pa.log() - pb.log())).sum(1)
    ref2 = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=pa),
                                             torch.distributions.Categorical(probs=pb))
    torch.testing.assert_close(ref, ref2)
    out = m.kl(a.float(), b.float()).double()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (m.kl(a.float(), b.float()) >= 0).all()
    assert (m.kl(a.float(), a.float()).abs() < 1e-6).all()
    rev = (pb * (pb.log() - pa.log())).sum(1)
    assert (rev - ref).abs().max() > 1e-2  # the direction is distinguishable on this data
    torch.testing.assert_close(m.kl(b.float(), a.float()).double(), rev, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", VAT_MODULES)
def test_kl_large_logits_finite(m):
    """p ~ one-hot on class 0, q puts log-prob -100 there: KL = 0 - (-100) = 100 (finite in float32 via log-softmax)."""
    p = torch.tensor([[50.0, -50.0]])
    q = torch.tensor([[-50.0, 50.0]])
    out = m.kl(p, q)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), torch.tensor([100.0], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("m", VAT_MODULES)
def test_entropy_hand_computed(m):
    """Uniform over K -> log K; p = (1/4, 1/2, 1/4) -> 1.5 log 2 (by hand); one-hot -> 0."""
    torch.testing.assert_close(m.entropy(torch.full((3, 10), 0.7)).double(),
                               torch.full((3,), math.log(10), dtype=torch.float64), rtol=1e-6, atol=0)
    p3 = torch.log(torch.tensor([[1.0, 2.0, 1.0]])) + 5.0  # shift-invariance of softmax
    torch.testing.assert_close(m.entropy(p3).double(), torch.tensor([1.5 * math.log(2)], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    sharp = torch.tensor([[100.0, 0.0, 0.0]])
    assert abs(m.entropy(sharp).item()) < 1e-6
    assert torch.isfinite(m.entropy(sharp)).all()


@pytest.mark.parametrize("m", VAT_MODULES)
def test_entropy_matches_explicit_sum_and_sgd_sharpens(m):
    """entropy = -sum p log p (explicit float64); one SGD step on mean entropy raises every max probability."""
    logits = torch.randn(16, 5, generator=gen(9), dtype=torch.float64)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(m.entropy(logits.float()).double(), -(p * p.log()).sum(1), rtol=1e-5, atol=1e-6)
    x = logits.float().clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=0.5)
    before = torch.softmax(x.detach(), 1).max(1).values
    m.entropy(x).mean().backward()
    opt.step()
    after = torch.softmax(x.detach(), 1).max(1).values
    assert (after > before).all()


@pytest.mark.parametrize("m", VAT_MODULES)
def test_unit_normalises_each_example_over_chw(m):
    """unit(d)[i] = d[i] / ||d[i]||_2 over C x H x W (explicit per-example loop)."""
    d = torch.randn(5, 3, 4, 6, generator=gen(10), dtype=torch.float64)
    d[2] *= 1e3
    d[3] *= 1e-3
    u = m.unit(d)
    assert u.shape == d.shape
    for i in range(5):
        torch.testing.assert_close(u[i], d[i] / d[i].flatten().norm(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(5, dtype=torch.float64), rtol=1e-6, atol=0)


def _linear_setup(n=64, seed=11):
    """x: [n, 1, 2, 3] (6 features), W: [6, 4] (K = 4), float64; f(x) = x.flatten(1) @ W."""
    g0 = gen(seed)
    x = torch.randn(n, 1, 2, 3, generator=g0, dtype=torch.float64)
    # distinct singular values so that the Hessians have a clear dominant eigenvector
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=g0, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=g0, dtype=torch.float64))
    W = u @ torch.diag(torch.tensor([3.0, 1.5, 0.8, 0.4], dtype=torch.float64)) @ v.T
    return x, W


def _kl_hessians(x, W):
    """Closed form: d^2/dr^2 KL(p || softmax((x + r) W)) at r = 0 equals W (diag(p) - p p^T) W^T."""
    p = torch.softmax(x.flatten(1) @ W, 1)
    C = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return W[None] @ C @ W.T[None]


def test_kl_hessian_closed_form_matches_autograd():
    """Sanity check of the reference itself: the closed-form Hessian equals autograd's hessian of KL."""
    x, W = _linear_setup(n=3)
    H = _kl_hessians(x, W)
    for i in range(3):
        xi = x[i].flatten()
        p = torch.softmax(xi @ W, 0)
        def kl_r(r):
            lq = torch.log_softmax((xi + r) @ W, 0)
            return (p * (p.log() - lq)).sum()
        Ha = torch.autograd.functional.hessian(kl_r, torch.zeros(6, dtype=torch.float64))
        torch.testing.assert_close(Ha, H[i], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("m", VAT_MODULES)
def test_r_adv_norm_is_eps(m):
    """Every example's r has L2 norm eps over C x H x W, r has x's shape and is not part of a graph."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    x = torch.randn(6, 3, 4, 4, generator=gen(12), dtype=torch.float64)
    for eps in (0.3, 2.0):
        r = m.r_adv(model, x, model(x).detach(), eps, 1e-3, 2, gen(13))
        assert r.shape == x.shape
        assert not r.requires_grad
        # (r's dtype is the implementation's choice: the VAT pass may run in float32)
        torch.testing.assert_close(r.double().flatten(1).norm(dim=1), torch.full((6,), eps, dtype=torch.float64),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("m", VAT_MODULES)
def test_r_adv_power_iteration_finds_dominant_hessian_eigenvector(m):
    """Linear-softmax model: r_adv(iters=30) is the top eigenvector of the closed-form KL Hessian; iters=1 beats random."""
    x, W = _linear_setup()
    f = lambda z: z.flatten(1) @ W
    H = _kl_hessians(x, W)
    evals, evecs = torch.linalg.eigh(H)  # ascending
    top = evecs[:, :, -1]
    # precondition on the reference: a clear eigengap, so 30 power steps converge to ~1e-4 or better
    assert (evals[:, -2] / evals[:, -1]).max() < 0.75
    eps = 0.5

    def cos(r):
        return (r.flatten(1) * top).sum(1).abs() / r.flatten(1).norm(dim=1)

    r30 = m.r_adv(f, x, f(x), eps, 1e-3, 30, gen(14))
    assert cos(r30).min() > 0.999

    r1 = m.r_adv(f, x, f(x), eps, 1e-3, 1, gen(15))
    rand = torch.randn(x.shape, generator=gen(16), dtype=torch.float64)
    assert cos(r1).mean() > cos(rand).mean() + 0.1
    # and adversarial is adversarial: KL along r_adv exceeds KL along random directions of norm eps
    p = f(x)
    kl_adv = vat.kl(p, f(x + r30)).double().mean()
    kl_rand = vat.kl(p, f(x + eps * rand / rand.flatten(1).norm(dim=1).view(-1, 1, 1, 1))).double().mean()
    assert kl_adv > 2 * kl_rand


@pytest.mark.parametrize("m", VAT_MODULES)
def test_r_adv_deterministic_given_generator(m):
    """Same generator seed -> same r; a different seed -> a different start, so (iters=1) a different r."""
    x, W = _linear_setup(n=8)
    f = lambda z: z.flatten(1) @ W
    a = m.r_adv(f, x, f(x), 1.0, 1e-3, 1, gen(17))
    b = m.r_adv(f, x, f(x), 1.0, 1e-3, 1, gen(17))
    c = m.r_adv(f, x, f(x), 1.0, 1e-3, 1, gen(18))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("m", VAT_MODULES)
def test_r_adv_no_gradient_leaks_into_parameters(m):
    """After r_adv with f = an nn.Linear module (params require grad, p_logits from f with a graph), every .grad is None."""
    torch.manual_seed(0)
    net = _TinyNet().double()
    x = torch.randn(5, 3, 2, 2, generator=gen(19), dtype=torch.float64)
    p_logits = net(x)  # still attached to the parameters' graph, as in training
    r = m.r_adv(net, x, p_logits, 1.0, 1e-3, 2, gen(20))
    for name, prm in net.named_parameters():
        assert prm.requires_grad
        assert prm.grad is None, name
    assert not r.requires_grad
    # the VAT loss then back-propagates into the parameters through f(x + r) only
    loss = vat.kl(p_logits.detach(), net(x + r)).mean()
    loss.backward()
    assert all(prm.grad is not None for prm in net.parameters())


@pytest.mark.parametrize("m", VAT_MODULES)
def test_vat_loss_nonnegative_and_zero_at_eps_zero(m):
    """L_vat = mean KL(f(x) || f(x + r)) is >= 0, > 0 for eps > 0, and exactly 0 for eps = 0."""
    torch.manual_seed(0)
    net = _TinyNet().double()
    x = torch.randn(7, 3, 2, 2, generator=gen(21), dtype=torch.float64)
    p = net(x).detach()
    r = m.r_adv(net, x, p, 0.5, 1e-3, 1, gen(22))
    l = m.kl(p, net(x + r))
    assert (l >= 0).all() and l.mean() > 0
    r0 = m.r_adv(net, x, p, 0.0, 1e-3, 1, gen(22))
    assert (r0 == 0).all()
    assert m.kl(p, net(x + r0)).mean().item() == 0.0


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6)).double()
    with torch.no_grad():  # non-default affine parameters and running statistics
        for bn in (model[1], model[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)
    return model.train()


def _batch_stat_forward(model, x):
    """Reference forward: every BN normalises with the batch's own mean and biased variance."""
    def bn(layer, h):
        dims = [0] + list(range(2, h.dim()))
        mean = h.mean(dims, keepdim=True)
        var = h.var(dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (h.dim() - 2)
        return (h - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(shape) + layer.bias.view(shape)
    h = model[0](x)
    h = torch.relu(bn(model[1], h)).flatten(1)
    return bn(model[5], model[4](h))


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("m", VAT_MODULES)
def test_bn_stats_frozen_uses_batch_stats_and_keeps_running_stats(m):
    """Inside bn_stats_frozen: output = batch-statistics BN (explicit mean/var), buffers bit-identical; restored after."""
    model = _bn_model()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6, generator=gen(23), dtype=torch.float64) * 2 + 1
    before = _buffers(model)
    with m.bn_stats_frozen(model):
        assert model.training
        out = model(x)
        out2 = model(x)
    torch.testing.assert_close(out, _batch_stat_forward(model, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    # and the BN layer alone equals F.batch_norm given the batch mean / biased variance as its statistics
    h = model[0](x).detach()
    with m.bn_stats_frozen(model):
        bn_out = model[1](h)
    mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(bn_out, F.batch_norm(h, mean, var, model[1].weight, model[1].bias,
                                                    training=False, eps=model[1].eps), rtol=1e-10, atol=1e-10)
    for k, v in _buffers(model).items():
        assert torch.equal(v, before[k]), k
    assert model.training
    # after the context, BN updates its running statistics again, exactly as an untouched twin
    x2 = torch.randn(8, 3, 6, 6, generator=gen(24), dtype=torch.float64)
    model(x2)
    twin(x2)
    for (k, v), (_, w) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(v, w), k
    assert model[1].num_batches_tracked.item() == 8


@pytest.mark.parametrize("m", VAT_MODULES)
def test_bn_stats_frozen_gradients_flow(m):
    """The VAT pass inside bn_stats_frozen is differentiable w.r.t. the input like plain batch-stat BN."""
    model = _bn_model()
    x = torch.randn(8, 3, 6, 6, generator=gen(25), dtype=torch.float64).requires_grad_(True)
    with m.bn_stats_frozen(model):
        (g,) = torch.autograd.grad(model(x).pow(2).sum(), x)
    (g_ref,) = torch.autograd.grad(_batch_stat_forward(model, x).pow(2).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------------
# 8-9. HSV conversions and HSV noise (reference: Python's colorsys)
# --------------------------------------------------------------------------------------------

EDGE_RGB = [(0, 0, 0), (1, 1, 1), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), (1, 0, 0), (0, 1, 0), (0, 0, 1),
            (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 0, 1e-3), (1, 1e-3, 0), (0.3, 0.2, 0.1), (0.1, 0.2, 0.3)]


def _pixels_image(rgb_list):
    """[1, 3, 1, P] image holding the given pixels."""
    t = torch.tensor(rgb_list, dtype=torch.float64)  # [P, 3]
    return t.T.reshape(1, 3, 1, -1)


def _hue_dist(a, b):
    d = (a - b).abs() % 1.0
    return torch.minimum(d, 1 - d)


def test_rgb_to_hsv_matches_colorsys():
    """common.rgb_to_hsv equals colorsys.rgb_to_hsv per pixel (random pixels + black/white/grays/primaries)."""
    rand = torch.rand(300, 3, generator=gen(26), dtype=torch.float64).tolist()
    pix = [tuple(p) for p in rand] + EDGE_RGB
    x = _pixels_image(pix)
    h, s, v = common.rgb_to_hsv(x)
    assert h.shape == (1, 1, len(pix))
    ref = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pix], dtype=torch.float64)
    h, s, v = h.flatten(), s.flatten(), v.flatten()
    assert (h >= 0).all() and (h <= 1).all() and (s >= 0).all() and (s <= 1).all()
    assert _hue_dist(h, ref[:, 0]).max() < 1e-5
    torch.testing.assert_close(s, ref[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(v, ref[:, 2], rtol=0, atol=1e-5)


def test_hsv_to_rgb_matches_colorsys_and_round_trip():
    """common.hsv_to_rgb equals colorsys.hsv_to_rgb per pixel (incl. h = 0, 1, sector borders), and RGB round trips."""
    g0 = gen(27)
    hsv = torch.rand(300, 3, generator=g0, dtype=torch.float64).tolist()
    hsv += [(0, 0, 0), (0, 0, 1), (0.5, 0, 0.4), (1.0, 1, 1), (0.0, 1, 1)] + [(k / 6, 1, 0.8) for k in range(7)]
    t = torch.tensor(hsv, dtype=torch.float64)
    out = common.hsv_to_rgb(t[:, 0].view(1, 1, -1), t[:, 1].view(1, 1, -1), t[:, 2].view(1, 1, -1))
    assert out.shape == (1, 3, 1, len(hsv))
    ref = torch.tensor([colorsys.hsv_to_rgb(*p) for p in hsv], dtype=torch.float64).T.reshape(1, 3, 1, -1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # round trip on an image batch, float32 and float64
    for dtype in (torch.float64, torch.float32):
        x = torch.rand(2, 3, 5, 7, generator=g0, dtype=torch.float64).to(dtype)
        x[0, :, 0, 0] = 0.3  # a gray pixel
        x[1, :, 0, 0] = 0.0  # a black pixel
        torch.testing.assert_close(common.hsv_to_rgb(*common.rgb_to_hsv(x)), x, rtol=0, atol=1e-5)


def _hsv_noise_reference(x, p):
    """Per-pixel colorsys reference of the SPEC's HSV noise."""
    N, _, H, W = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for n in range(N):
        hs, e_s, m_s, a_s, e_v, m_v, a_v = [float(t) for t in p[n]]
        for i in range(H):
            for j in range(W):
                h, s, v = colorsys.rgb_to_hsv(*[float(x[n, c, i, j]) for c in range(3)])
                h = (h + hs) % 1.0
                s = min(max(s ** (2 ** e_s) * 2 ** m_s + a_s, 0.0), 1.0)
                v = min(max(v ** (2 ** e_v) * 2 ** m_v + a_v, 0.0), 1.0)
                out[n, :, i, j] = torch.tensor(colorsys.hsv_to_rgb(h, s, v), dtype=torch.float64)
    return out


def _spec_hsv_params(n, g0):
    """Draw p as in SPEC: hue U(-0.1, 0.1); S and V: e U(-2, 2), m U(-0.5, 0.5), a U(-0.1, 0.1)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g0, dtype=torch.float64)
    return torch.stack([u(-0.1, 0.1), u(-2, 2), u(-0.5, 0.5), u(-0.1, 0.1), u(-2, 2), u(-0.5, 0.5), u(-0.1, 0.1)], 1)


def test_hsv_noise_matches_colorsys_reference():
    """hsv_noise equals a per-pixel colorsys implementation of h+p0 mod 1, s/v -> clip(s^(2^e) 2^m + a, 0, 1)."""
    g0 = gen(28)
    x = torch.rand(4, 3, 5, 6, generator=g0, dtype=torch.float64)
    x[0, :, 0, 0] = 0.4  # gray: colorsys hue 0, which matters once a > 0 makes it saturated
    x[1, :, 0, 1] = 0.0  # black
    x[2, :, 0, 2] = 1.0  # white
    p = _spec_hsv_params(4, g0)
    p[0, 3] = 0.08  # gray pixel of image 0 gets saturation 0.08 and thus the shifted hue p0
    p[3] = torch.tensor([0.95, 1.0, -0.3, 0.05, -1.5, 0.4, -0.05])  # large hue shift, wraps around
    out = common.hsv_noise(x, p)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _hsv_noise_reference(x, p), rtol=0, atol=1e-5)


def test_hsv_noise_identity_and_negative_hue():
    """p = 0 leaves the image unchanged; a hue shift of -0.25 wraps like Python's % (reference: colorsys)."""
    g0 = gen(29)
    x = torch.rand(3, 3, 4, 4, generator=g0, dtype=torch.float64)
    torch.testing.assert_close(common.hsv_noise(x, torch.zeros(3, 7, dtype=torch.float64)), x, rtol=0, atol=1e-5)
    x32 = x.float()
    torch.testing.assert_close(common.hsv_noise(x32, torch.zeros(3, 7)), x32, rtol=0, atol=1e-5)
    p = torch.zeros(3, 7, dtype=torch.float64)
    p[:, 0] = -0.25
    torch.testing.assert_close(common.hsv_noise(x, p), _hsv_noise_reference(x, p), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 10. Rotations
# --------------------------------------------------------------------------------------------

def _rot_ccw_reference(img, r):
    """Explicit index arithmetic for an [H, W] image (H == W) rotated r * 90 degrees counter-clockwise.

    CCW 90: the right column becomes the top row, so out[i, j] = img[j, W-1-i].
    180:    out[i, j] = img[H-1-i, W-1-j].
    CCW 270 (= CW 90): the left column becomes the top row read bottom-up, out[i, j] = img[H-1-j, i]."""
    H, W = img.shape
    out = torch.empty(W, H, dtype=img.dtype) if r % 2 else torch.empty(H, W, dtype=img.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            if r == 0:
                out[i, j] = img[i, j]
            elif r == 1:
                out[i, j] = img[j, W - 1 - i]
            elif r == 2:
                out[i, j] = img[H - 1 - i, W - 1 - j]
            else:
                out[i, j] = img[H - 1 - j, i]
    return out


def test_rotation_reference_itself():
    """The hand reference on [[1, 2], [3, 4]]: CCW -> [[2, 4], [1, 3]], 180 -> [[4, 3], [2, 1]], CW -> [[3, 1], [4, 2]]."""
    img = torch.tensor([[1, 2], [3, 4]])
    assert _rot_ccw_reference(img, 1).tolist() == [[2, 4], [1, 3]]
    assert _rot_ccw_reference(img, 2).tolist() == [[4, 3], [2, 1]]
    assert _rot_ccw_reference(img, 3).tolist() == [[3, 1], [4, 2]]


@pytest.mark.parametrize("m", ROT_MODULES)
def test_rotate4_matches_index_arithmetic(m):
    """rotate4(x)[r*N:(r+1)*N] = x rotated r*90 degrees CCW, by explicit index arithmetic on non-symmetric images."""
    N, C, S = 3, 2, 4
    x = torch.arange(N * C * S * S, dtype=torch.float32).view(N, C, S, S)
    x = x[:, :, :, torch.randperm(S, generator=gen(30))] * 1.0  # make it non-symmetric in every way
    x = x + torch.rand(x.shape, generator=gen(31))
    out = m.rotate4(x)
    assert out.shape == (4 * N, C, S, S)
    for r in range(4):
        for n in range(N):
            for c in range(C):
                assert torch.equal(out[r * N + n, c], _rot_ccw_reference(x[n, c], r)), (r, n, c)
    # a single marked pixel at the top-right corner goes to the top-left corner after CCW 90
    y = torch.zeros(1, 1, S, S)
    y[0, 0, 0, S - 1] = 1
    o = m.rotate4(y)
    assert o[1, 0, 0, 0] == 1 and o[1].sum() == 1
    assert o[2, 0, S - 1, 0] == 1 and o[3, 0, S - 1, S - 1] == 1


@pytest.mark.parametrize("m", ROT_MODULES)
def test_rot_labels(m):
    """rot_labels(n) = [0]*n + [1]*n + [2]*n + [3]*n as an integer tensor on the requested device."""
    lab = m.rot_labels(5, torch.device("cpu"))
    assert lab.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert lab.dtype == torch.long
    assert lab.device.type == "cpu"


# --------------------------------------------------------------------------------------------
# 11. MOAM Polyak averaging
# --------------------------------------------------------------------------------------------

class _PolyakNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.bn = nn.BatchNorm1d(3)
        self.frozen = nn.Parameter(torch.tensor([5.0]), requires_grad=False)


def _set_params(net, value):
    with torch.no_grad():
        for prm in net.parameters():
            if prm.requires_grad:
                prm.fill_(value)


def test_polyak_decay_value():
    """decay = 0.5 ** (1 / steps_per_epoch): after steps_per_epoch updates the old average's weight is 1/2."""
    for spe in (1, 4, 100):
        avg = moam.Polyak(_PolyakNet(), spe)
        assert avg.decay == pytest.approx(0.5 ** (1 / spe), rel=1e-12)
        assert avg.decay ** spe == pytest.approx(0.5, rel=1e-12)


def test_polyak_debiased_average_hand_computed():
    """averaged() = sum_k w_k p_k / sum_k w_k, w_k = decay^(t-k) (hand-computed), params only; buffers are live."""
    net = _PolyakNet()
    spe = 3
    avg = moam.Polyak(net, spe)
    decay = 0.5 ** (1 / spe)
    values = [1.0, 2.0, 3.0, -4.0]
    for t, val in enumerate(values, start=1):
        _set_params(net, val)
        avg.update(net)
        w = [decay ** (t - k) for k in range(1, t + 1)]
        expected = sum(wk * pk for wk, pk in zip(w, values[:t])) / sum(w)
        # the same number via the zero-debiased EMA recursion, written out by hand
        shadow = 0.0
        for pk in values[:t]:
            shadow = decay * shadow + (1 - decay) * pk
        assert shadow / (1 - decay ** t) == pytest.approx(expected, rel=1e-12)
        if t == 1:
            assert expected == 1.0  # debiasing: one update gives the parameter itself
        with torch.no_grad():  # the live model's buffers now differ from anything averaged
            net.bn.running_mean.fill_(10.0 * t)
            net.bn.running_var.fill_(0.5 * t)
            net.bn.num_batches_tracked.fill_(100 + t)
            net.frozen.fill_(7.0 + t)
        sd = avg.averaged(net)
        assert set(sd) == set(net.state_dict())
        for name in ("lin.weight", "lin.bias", "bn.weight", "bn.bias"):
            torch.testing.assert_close(sd[name].double(), torch.full_like(sd[name], expected).double(),
                                       rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sd["bn.running_mean"], torch.full((3,), 10.0 * t))
        torch.testing.assert_close(sd["bn.running_var"], torch.full((3,), 0.5 * t))
        assert sd["bn.num_batches_tracked"].item() == 100 + t
        # a parameter that does not require grad is not trainable: taken from the live model
        assert sd["frozen"].item() == 7.0 + t
        # the live model is not modified by averaged()
        assert net.lin.weight.detach().eq(val).all()


def test_polyak_state_dict_round_trip():
    """A fresh Polyak loaded from state_dict() gives the same averaged() now and after further identical updates."""
    torch.manual_seed(0)
    net = _PolyakNet()
    a = moam.Polyak(net, 5)
    for v in (0.5, -1.0, 2.0):
        _set_params(net, v)
        a.update(net)
    b = moam.Polyak(_PolyakNet(), 5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for k, v in a.averaged(net).items():
        torch.testing.assert_close(b.averaged(net)[k], v, rtol=0, atol=0)
    for v in (3.0, 4.0):
        _set_params(net, v)
        a.update(net)
        b.update(net)
    for k, v in a.averaged(net).items():
        torch.testing.assert_close(b.averaged(net)[k], v, rtol=0, atol=0)
