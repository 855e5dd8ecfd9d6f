"""VAR's p / rho conventions (issue 14, item 5): the paper moves a share p of the sink attention
and keeps rows whose visual non-sink ratio is >= rho; the reference code keeps a share p_code and
keeps rows whose visual *sink* share is <= rho_code. ``preset="official"`` is the reference's
example config (p_code 0.6, rho_code 0.5) converted: p = 0.4, rho = 0.5."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from innersight.attend.var import OFFICIAL_P, OFFICIAL_RHO, VARConfig, from_reference, redistribute
from innersight.errors import MethodError
from innersight.methods import resolve_methods

# keys: [BOS (text sink), image sink, image, image, image, text]
SINKS = torch.tensor([True, True, False, False, False, False])
IMAGE = torch.tensor([False, True, True, True, True, False])


def _reference_code_row(row: list[float], p_code: float, rho_code: float, summ: float = 0.2) -> list[float]:
    """The reference code's rule, written out per entry (plain floats, no torch): a row qualifies
    when its image sum >= summ and the visual sink share of its image attention <= rho_code; sinks
    are multiplied by p_code and (1 - p_code) of their sum goes to the non-sink image tokens in
    proportion to their attention."""
    image = [i for i in range(6) if IMAGE[i]]
    sinks = [i for i in range(6) if SINKS[i]]
    targets = [i for i in image if i not in sinks]
    image_sum = sum(row[i] for i in image)
    sink_share = sum(row[i] for i in image if i in sinks) / image_sum
    if not (image_sum >= summ and sink_share <= rho_code):
        return list(row)
    budget = (1 - p_code) * sum(row[i] for i in sinks)
    target_sum = sum(row[i] for i in targets)
    out = list(row)
    for i in sinks:
        out[i] = row[i] * p_code
    for i in targets:
        out[i] = row[i] + budget * row[i] / target_sum
    return out


def test_official_preset_is_the_reference_example_config_converted():
    official = VARConfig(preset="official")
    assert (official.effective_p, official.effective_rho) == (0.4, 0.5) == (OFFICIAL_P, OFFICIAL_RHO)
    paper = VARConfig()
    assert (paper.effective_p, paper.effective_rho) == (0.6, 0.8)
    assert VARConfig(preset="official", task="vision-centric").effective_rho == 0.5  # the preset fixes rho
    assert VARConfig(preset="official", p=0.7, rho=0.9).effective_p == 0.7  # explicit values win
    assert VARConfig(preset="official", p=0.7, rho=0.9).effective_rho == 0.9
    assert from_reference(0.6, 0.5) == (0.4, 0.5)
    assert from_reference(0.4, 0.2) == (0.6, 0.8)  # the paper's general setting written the code's way
    with pytest.raises(MethodError):
        VARConfig(preset="code")


def test_field_metadata_documents_both_conventions():
    fields = {f.name: f for f in dataclasses.fields(VARConfig)}
    assert "(1 - p)" in fields["p"].metadata["source"] and "0.4" in fields["p"].metadata["official"]
    assert "r >= rho" in fields["rho"].metadata["source"] and "0.5" in fields["rho"].metadata["official"]
    assert "VisAttnSink" in fields["preset"].metadata["source"]


@pytest.mark.parametrize("row", [
    [0.1, 0.2, 0.3, 0.2, 0.1, 0.1],  # image 0.8, sink share 0.25: qualifies under rho 0.5
    [0.05, 0.5, 0.2, 0.1, 0.05, 0.1],  # sink share 0.5 / 0.85 = 0.59 > 0.5: untouched
    [0.3, 0.02, 0.08, 0.05, 0.04, 0.51],  # image sum 0.19 < 0.2: untouched
    [0.0, 0.04, 0.4, 0.3, 0.2, 0.06],  # no text sink attention, image sink 0.04
])
def test_paper_semantics_with_the_official_values_equal_the_reference_rule(row):
    config = VARConfig(preset="official")
    new, _ = redistribute(torch.tensor(row, dtype=torch.float64), SINKS, IMAGE, p=config.effective_p,
                          rho=config.effective_rho, min_image_attention=config.min_image_attention)
    expected = _reference_code_row(row, p_code=0.6, rho_code=0.5)
    torch.testing.assert_close(new, torch.tensor(expected, dtype=torch.float64))


def test_the_paper_default_moves_sixty_percent():
    row = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)  # non-sink ratio 0.75
    config = VARConfig(rho=0.5)
    new, ok = redistribute(row, SINKS, IMAGE, p=config.effective_p, rho=config.effective_rho)
    assert bool(ok)
    torch.testing.assert_close(new[:2], torch.tensor([0.04, 0.08], dtype=torch.float64))  # 40% of 0.1, 0.2 kept
    assert float(new[2:5].sum()) == pytest.approx(0.6 + 0.6 * 0.3)


def test_the_preset_is_settable_from_the_command_line_syntax():
    (method,) = resolve_methods(["var"], {"var": {"preset": "official"}}).objects
    assert (method.config.effective_p, method.config.effective_rho) == (0.4, 0.5)
