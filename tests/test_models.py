import copy

import numpy as np
import pytest
import torch

from mnv2_tvm.errors import UserError
from mnv2_tvm.models import WIDTHS, ModelConfig, build, example_input, fold_batchnorm, load_weights
from mnv2_tvm.models.mobilenet_v2 import MobileNetV2, make_divisible
from mnv2_tvm.models.ssdlite import make_anchors
from mnv2_tvm.postprocess import nms


@pytest.mark.parametrize("width", WIDTHS)
def test_mobilenet_v2_builds_at_every_paper_width_and_resolution(width):
    for resolution in (96, 128, 160, 192, 224):
        model = build(ModelConfig(width=width, resolution=resolution))
        with torch.no_grad():
            out = model(torch.zeros(1, 3, resolution, resolution))
        assert out.shape == (1, 1000)


def test_channels_round_to_multiples_of_8_and_last_layer_is_not_shrunk():
    model = MobileNetV2(width=0.35)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert convs[-1].out_channels == 1280
    assert MobileNetV2(width=1.4).last_channel == make_divisible(1280 * 1.4) == 1792


def test_table2_shapes_of_mobilenet_v2():
    model = build(ModelConfig())
    sizes = []
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        for layer in model.features:
            x = layer(x)
            sizes.append((x.shape[1], x.shape[2]))
    # Table 2: after each stage (c, spatial): 32@112, 16@112, 24@56, 32@28, 64@14, 96@14, 160@7, 320@7, 1280@7
    stage_ends = [0, 1, 3, 6, 10, 13, 16, 17, 18]
    assert [sizes[i] for i in stage_ends] == [(32, 112), (16, 112), (24, 56), (32, 28), (64, 14), (96, 14),
                                               (160, 7), (320, 7), (1280, 7)]


def test_random_models_have_unit_scale_outputs():
    # Vanishing activations would make every parity check pass trivially.
    for cfg in (ModelConfig(width=0.35, resolution=96), ModelConfig("deeplabv3", 0.35, 129)):
        out = build(cfg)(torch.from_numpy(example_input(cfg))).detach().numpy()
        assert 0.05 < np.abs(out).max() < 100


def test_batchnorm_folding_keeps_outputs_and_removes_every_bn():
    cfg = ModelConfig("ssdlite", width=0.5, resolution=128)
    model = build(cfg)
    x = torch.from_numpy(example_input(cfg))
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(copy.deepcopy(model))
        after = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(before, after, atol=1e-4)


def test_torchvision_layout_state_dict_loads(tmp_path):
    cfg = ModelConfig(width=0.5, resolution=96)
    donor = MobileNetV2(0.5)
    state = donor.state_dict()
    assert "features.1.conv.0.0.weight" in state and "classifier.1.weight" in state
    assert "features.2.conv.3.running_var" in state
    torch.manual_seed(5)
    for v in state.values():
        if v.dtype.is_floating_point:
            v.copy_(torch.rand_like(v) * 0.5 + 0.1)
    path = tmp_path / "mnv2.pth"
    torch.save(state, path)
    model = build(cfg, weights=path)
    assert torch.equal(model.classifier[1].weight, state["classifier.1.weight"])
    assert torch.equal(model.features[2].conv[3].running_var, state["features.2.conv.3.running_var"])


def test_state_dict_with_wrong_keys_or_shapes_is_refused(tmp_path):
    state = MobileNetV2(0.5).state_dict()
    renamed = {k.replace("features.", "backbone."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(UserError, match="missing .* keys"):
        load_weights(MobileNetV2(0.5), tmp_path / "renamed.pth")
    torch.save(MobileNetV2(1.0).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UserError, match="has shape"):
        load_weights(MobileNetV2(0.5), tmp_path / "wide.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="not a readable"):
        load_weights(MobileNetV2(0.5), tmp_path / "junk.pth")


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="resnet50"), "unknown model"),
    (dict(width=0.0), "width 0 is invalid"),
    (dict(width=-1.0), "must be in"),
    (dict(width=4.5), "width 4.5 is invalid"),
    (dict(width=float("nan")), "invalid"),
    (dict(resolution=100), "multiple of 32"),
    (dict(resolution=0), "at least 32"),
    (dict(model="ssdlite", num_classes=10), "supports 80, 81, 91"),
    (dict(model="deeplabv3", output_stride=32), "output stride"),
])
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**kwargs)


def test_ssdlite_anchors_and_output_layout():
    anchors = make_anchors(320)
    assert anchors.shape == (20 * 20 * 3 + (100 + 25 + 9 + 4 + 1) * 6, 4)
    cfg = ModelConfig("ssdlite", 0.35, 128)
    out = build(cfg)(torch.from_numpy(example_input(cfg))).detach().numpy()
    assert out.shape == (1, len(make_anchors(128)), 4 + 81)
    assert ((out[..., 4:] >= 0) & (out[..., 4:] <= 1)).all()  # sigmoid scores


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0.9, 1], [0.5, 0.5, 1.5, 1.5], [2, 2, 3, 3]], np.float32)
    scores = np.array([0.9, 0.95, 0.5, 0.4], np.float32)
    assert nms(boxes, scores, 0.5) == [1, 2, 3]


def test_deeplab_output_stride_uses_dilation_not_resolution_loss():
    for os_ in (8, 16):
        model = build(ModelConfig("deeplabv3", 0.5, 129, output_stride=os_))
        with torch.no_grad():
            feat = model.backbone(torch.zeros(1, 3, 129, 129))
        assert feat.shape[-1] == {8: 17, 16: 9}[os_]
        assert model(torch.zeros(1, 3, 129, 129)).shape == (1, 21, 129, 129)


@pytest.mark.parametrize("width", [0.6, 0.9, 2.0, 0.05])
def test_any_width_rounds_channels_as_torchvision_does(width):
    """Channels are multiples of 8, never below 8, and lose at most 10 % to rounding (torchvision's rule)."""
    from mnv2_tvm.madds import count

    def torchvision_round(v: float) -> int:
        new = max(8, int(v + 4) // 8 * 8)
        return new + 8 if new < 0.9 * v else new

    model = MobileNetV2(width=width)
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == torchvision_round(32 * width)
    widths = {c.out_channels for c in convs}
    assert all(c % 8 == 0 and c >= 8 for c in widths)
    assert torchvision_round(320 * width) in widths
    assert model.last_channel == torchvision_round(1280 * max(1.0, width))
    c = count(ModelConfig(width=width, resolution=96))
    assert c.params == sum(p.numel() for p in build(ModelConfig(width=width, resolution=96)).parameters())
    assert c.madds > 0
