"""apla.show: the library's source as the notebooks put it on the page, read from the file, with its line numbers;
and the drawings made from a model (vgt_diagram)."""
import inspect
import xml.etree.ElementTree as ET

import pytest
import torch

import apla.scheduler
import apla.vgt
from apla.show import ELIDED, MARK, blocks, draw, show, trace, vgt_diagram


def _file_lines(obj):
    return open(inspect.getsourcefile(obj), encoding="utf-8").read().split("\n")


def test_whole_function_is_its_file_lines_with_numbers():
    src = show(apla.vgt.perturbed_eps)
    assert src.name == "apla.vgt.perturbed_eps" and src.path == "apla/vgt.py"
    lines = _file_lines(apla.vgt.perturbed_eps)
    assert src.lines[0].startswith("def perturbed_eps(") and src.lines[-1] == "    return eps_pred + phi"
    assert all(lines[n - 1] == line for n, line in zip(src.numbers, src.lines))  # each line where its number says
    assert src.numbers == list(range(src.numbers[0], src.numbers[0] + len(src.lines)))
    md = src._repr_markdown_()
    assert md.startswith(MARK.format("apla.vgt.perturbed_eps")) and f"```python\n{src.code}\n```" in md
    assert f"lines {src.numbers[0]}–{src.numbers[-1]}" in md


def test_method_is_dedented_and_docstring_can_be_left_out():
    src = show(apla.vgt.DecoderBlock.forward, docstring=False)
    assert src.name == "apla.vgt.DecoderBlock.forward" and src.lines[0].startswith("def forward(")
    markers = [line for line, n in zip(src.lines, src.numbers) if n is None]
    assert len(markers) == 1 and markers[0].strip().startswith(ELIDED) and "docstring" in markers[0]
    assert '"""' not in src.code
    whole = show(apla.vgt.DecoderBlock.forward)
    assert len(whole.lines) > len(src.lines) and '"""' in whole.code


def test_start_end_show_the_lines_that_matter_under_the_signature():
    src = show(apla.scheduler.ddim_step, start="z0_pred =", end="return")
    kept = [line for line, n in zip(src.lines, src.numbers) if n is not None]
    assert kept[0].startswith("def ddim_step(") and kept[-1].strip() == "return z_prev"
    assert any("z0_pred =" in line for line in kept) and not any('"""' in line for line in kept)
    assert sum(n is None for n in src.numbers) == 1  # the docstring and anything before "z0_pred =" elided
    lines = _file_lines(apla.scheduler.ddim_step)
    assert all(lines[n - 1].strip() == line.strip() for n, line in zip(src.numbers, src.lines) if n is not None)


def test_a_start_that_is_not_there_is_an_error():
    with pytest.raises(ValueError, match="no line containing 'nothing like this'"):
        show(apla.vgt.perturbed_eps, start="nothing like this")


# ---- trace and draw: a network's data flow from one real forward pass -------------------------------------------
def _tiny_unet():
    from apla.sd.unet import UNet3DConditionModel, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=2, cross_attention_dim=8,
                     norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet3DConditionModel(cfg).eval()


def test_trace_follows_the_data_through_any_operation_and_only_what_is_used():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])

        def forward(self, x, unused, pool):
            h = self.a(x)
            return self.b[1](self.b[0](h) + h.t().t() + pool.pop())  # the residual through two transposes

    toy = Toy()
    calls = trace(toy, torch.randn(2, 3), torch.randn(2, 3), [torch.randn(2, 3), torch.randn(2, 3)])
    assert [(c.name, c.kind, c.shape) for c in calls] == [("a", "Linear", (2, 3)), ("b.0", "Linear", (2, 3)),
                                                           ("b.1", "Linear", (2, 3))]
    assert [c.reads for c in calls] == [["x"], ["a"], ["a", "b.0", "pool"]]  # `unused` is never read
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in toy.modules())  # the model is left as it was


def test_trace_of_the_unet_shows_its_path_and_its_skips_last_in_first_out():
    unet = _tiny_unet()
    z, context = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 77, 8)
    assert list(blocks(unet, 1)) == ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "mid_block",
                                     "up_blocks.0", "up_blocks.1", "conv_norm_out", "conv_out"]
    calls = trace(unet, z, torch.tensor(10), context, level=2)
    names = [c.name for c in calls]
    assert sorted(names) == sorted(blocks(unet, 2)) and names[:2] == ["time_embedding", "conv_in"]  # order of calls
    by = {c.name: c for c in calls}
    assert by["conv_in"].shape == (3, 8, 8, 8) and by["down_blocks.0.downsamplers.0"].shape == (3, 8, 4, 4)
    assert by["conv_out"].shape == (3, 4, 8, 8) and by["time_embedding"].shape == (1, 32)
    assert by["down_blocks.0.attentions.0"].reads == ["context", "down_blocks.0.resnets.0"]
    # each up-path ResNet reads the previous call, the time embedding, and one skip: the down path's, in reverse
    ups = [c for c in calls if c.name.startswith("up_blocks") and c.kind == "ResnetBlock"]
    skips = [next(r for r in c.reads if r not in (names[names.index(c.name) - 1], "time_embedding")) for c in ups]
    assert skips == ["down_blocks.1.resnets.0", "down_blocks.0.downsamplers.0", "down_blocks.0.attentions.0",
                     "conv_in"]
    assert all(len(c.reads) == 3 for c in ups)


def test_draw_has_a_box_per_call_and_an_arrow_per_drawn_read():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = trace(_tiny_unet(), torch.randn(1, 4, 2, 8, 8), torch.tensor(10), torch.randn(1, 77, 8), level=2)
    ax = draw(calls)
    arrows = [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None]
    names = [c.name for c in calls]
    drawn = [(c.name, r) for c in calls for r in c.reads if r in names and r != "time_embedding"]
    assert len(ax.patches) == len(calls) and len(arrows) == len(drawn)
    dashed = [a for a in arrows if a.arrow_patch.get_linestyle() != "-"]
    assert len(dashed) == sum(names.index(r) != names.index(n) - 1 for n, r in drawn) == 4  # the four skips
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend >= {"reads context", "reads time_embedding", "ResnetBlock"}
    plt.close(ax.figure)


SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("variant, depths", [("pure", (2, 3)), ("hyper", (1, 2)), ("pure-en", (1, 1)), ("pure-frame", (1, 2))])
def test_vgt_diagram_is_drawn_from_the_model_and_one_forward_pass(variant, depths):
    """Each box comes from the model given (its depths, widths, mask, fusion) and each tensor's shape from the
    VGTIntermediates of its forward pass; the SVG is well-formed and holds the same text, one line per arrow."""
    config = apla.vgt.VGTConfig(variant=variant, sample_size=8, max_frames=3, width=16, spatial_depth=depths[0],
                                temporal_depth=depths[1], heads=2, mlp_hidden=32)
    vgt = apla.vgt.VGT(config).eval()
    with torch.no_grad():
        out = vgt(torch.randn(1, 4, 3, 8, 6), 10, return_intermediates=True)  # H != W: N = 4 * 3 patches
    diagram = vgt_diagram(vgt, out)
    text = str(diagram)
    for name in out._fields:
        label = "y*" if name == "y" and config.hyper else name
        assert f"{label} {tuple(getattr(out, name).shape)}" in text, name
    assert f"{depths[0]} × DecoderBlock (LN, MMSA, 2 heads), norm_s" in text
    assert f"{depths[1]} × DecoderBlock (LN, MMSA, 2 heads), norm_t" in text
    assert ("mask decoder_mask(13)" in text) == config.masked and ("mask frame_mask(4)" in text) == config.per_frame
    assert ("HyperBlock M · Eq. 14" in text) == config.hyper != ("hadamard_fusion · Eq. 12" in text)
    assert "Linear(16 → 32), GELU, Linear(32 → 16)" in text  # the head: d -> mlp_hidden -> C*P*P
    svg = ET.fromstring(diagram._repr_svg_())
    texts = {e.text for e in svg.iter(f"{SVG}text")}
    assert all({b.title, *b.lines} <= texts for b in diagram.boxes.values())
    assert len(svg.findall(f"{SVG}polyline")) == len(diagram.arrows) and len(svg.findall(f"{SVG}rect")) == 1 + len(diagram.boxes)
