"""apla.show: the library's source as the notebooks put it on the page, read from the file, with its line numbers."""
import inspect

import pytest

import apla.scheduler
import apla.vgt
from apla.show import ELIDED, MARK, show


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
