"""common.ResNetV2 against an independent implementation of the same architecture, timm's resnetv2_50
(pre-activation bottlenecks, stride on the 3x3, projection from the pre-activated input, final BN+ReLU):
the same parameter count, and the same outputs once our weights are copied into it. Skipped where timm is
not installed (CI); run where it is, e.g. on the GPU machine."""
import pytest
import torch

import common

timm = pytest.importorskip("timm")


def to_timm(state, stages=(3, 4, 6, 3)):
    """Our state-dict names -> timm's (stages.S.blocks.J.norm1/conv1/..., downsample.conv, head.fc)."""
    where = [(s, j) for s, n in enumerate(stages) for j in range(n)]
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if p[0] == "stem":
            out["stem.conv.weight"] = v
        elif p[0] == "blocks":
            s, j = where[int(p[1])]
            if p[2] == "proj":
                name = "downsample.conv.weight"
            else:  # bns.I.* -> normI+1.*, convs.I.weight -> convI+1.weight
                name = f"{'norm' if p[2] == 'bns' else 'conv'}{int(p[3]) + 1}.{p[-1]}"
            out[f"stages.{s}.blocks.{j}.{name}"] = v
        elif p[0] == "fc":
            out[f"head.fc.{p[1]}"] = v[:, :, None, None] if p[1] == "weight" else v
        else:
            out[k] = v
    return out


def test_same_parameter_count_as_timm():
    assert sum(p.numel() for p in timm.create_model("resnetv2_50").parameters()) == 25_549_352


def test_same_outputs_as_timm_resnetv2_50():
    torch.manual_seed(0)
    ours = common.ResNetV2(50, 1, 1000)
    for m in ours.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    theirs = timm.create_model("resnetv2_50")
    theirs.load_state_dict(to_timm(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 160, 160)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
