import json

import pytest

from mnv2_tvm.madds import count
from mnv2_tvm.models import ModelConfig

# The paper's published grid (MAdds in millions) for MobileNetV2 width x resolution.
PAPER_GRID = {
    1.4: {224: 582}, 1.3: {224: 509},
    1.0: {224: 300, 192: 221, 160: 154, 128: 99, 96: 56},
    0.75: {224: 209, 192: 153, 160: 107, 128: 69, 96: 39},
    0.5: {224: 97, 192: 71, 160: 50, 128: 32, 96: 18},
    0.35: {224: 59, 192: 43, 160: 30, 128: 20, 96: 11},
}


def test_mobilenet_v2_1_0_224_matches_paper():
    c = count(ModelConfig())
    assert abs(c.madds / 300e6 - 1) < 0.01
    assert 3.4e6 <= c.params <= 3.51e6


def test_counter_agrees_with_the_papers_grid():
    ratios = []
    for width, row in PAPER_GRID.items():
        for res, paper in row.items():
            ours = count(ModelConfig(width=width, resolution=res)).madds / 1e6
            # The published values are truncated to whole millions, which matters most for tiny configs.
            assert paper <= ours < paper + 1.0, (width, res, ours, paper)
            ratios.append(ours / paper)
    assert sorted(ratios)[len(ratios) // 2] < 1.01


@pytest.mark.parametrize("cfg, madds, params, tol", [
    (ModelConfig("ssdlite"), 0.8e9, 4.3e6, 0.03),
    (ModelConfig("deeplabv3"), 2.75e9, 2.11e6, 0.01),
])
def test_detector_and_segmenter_rows_of_the_paper(cfg, madds, params, tol):
    c = count(cfg)
    assert abs(c.madds / madds - 1) < tol
    assert abs(c.params / params - 1) < tol


@pytest.mark.slow
def test_output_stride_8_matches_the_papers_multi_scale_figure():
    """The paper's only OS 8 row without ASPP (Table 7: 152.6B MAdds) evaluates six input scales,
    0.5 to 1.75, each also flipped; our single-scale count summed the same way must land on it."""
    single = count(ModelConfig("deeplabv3", output_stride=8)).madds
    assert 8.7e9 < single < 8.9e9
    scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    total = 2 * sum(count(ModelConfig("deeplabv3", resolution=round(512 * s) + 1, output_stride=8)).madds
                    for s in scales)
    assert abs(total / 152.6e9 - 1) < 0.01


def test_per_layer_rows_add_up_and_have_kinds():
    c = count(ModelConfig(width=0.5, resolution=128))
    assert sum(layer.madds for layer in c.layers) == c.madds
    kinds = {layer.kind for layer in c.layers}
    assert kinds == {"conv", "depthwise", "pointwise", "linear"}
    first = c.layers[0]
    # 3x3 conv, 3 -> 16 channels, 64x64 output: 9 * 3 MAdds per output element.
    assert (first.kind, first.output_shape, first.madds) == ("conv", (1, 16, 64, 64), 9 * 3 * 16 * 64 * 64)
    dw = next(layer for layer in c.layers if layer.kind == "depthwise")
    assert dw.madds == 9 * dw.output_shape[1] * dw.output_shape[2] * dw.output_shape[3]
    assert all(layer.bytes > 4 * layer.params for layer in c.layers)


def test_json_output_shape():
    d = json.loads(json.dumps(count(ModelConfig("deeplabv3", 0.5, 257)).to_dict(per_layer=True)))
    assert {"model", "width", "resolution", "madds", "params", "layers"} <= d.keys()
    assert isinstance(d["madds"], int) and d["layers"][0]["kind"] == "conv"
