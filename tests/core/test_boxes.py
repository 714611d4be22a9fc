"""Box coding on non-square boxes and references: a width/height mix-up cannot cancel out."""

from __future__ import annotations

import math

import pytest
import torch

from detkit.boxes import decode, encode

# A wide reference (100 x 20) and a tall one (15 x 90), each with a box of another shape.
REFS = torch.tensor([[0.0, 0.0, 100.0, 20.0], [0.0, 0.0, 15.0, 90.0]], dtype=torch.float64)
BOXES = torch.tensor([[10.0, 5.0, 70.0, 25.0], [3.0, 30.0, 33.0, 60.0]], dtype=torch.float64)
# By hand: dx = (cx - cx_ref) / w_ref, dy = (cy - cy_ref) / h_ref, dw = log(w / w_ref), dh = log(h / h_ref).
DELTAS = torch.tensor([
    [(40 - 50) / 100, (15 - 10) / 20, math.log(60 / 100), math.log(20 / 20)],
    [(18 - 7.5) / 15, (45 - 45) / 90, math.log(30 / 15), math.log(30 / 90)],
], dtype=torch.float64)
STD = (0.1, 0.2, 0.3, 0.4)  # all different, so a swapped component shows


@pytest.mark.parametrize("std", [None, STD])
def test_encode_gives_the_hand_computed_deltas_and_decode_inverts_it(std):
    expected = DELTAS if std is None else DELTAS / torch.tensor(STD, dtype=torch.float64)
    deltas = encode(REFS, BOXES, std)
    assert torch.allclose(deltas, expected, atol=1e-12)
    assert torch.allclose(decode(REFS, deltas, std), BOXES, atol=1e-9)


@pytest.mark.parametrize("std", [None, STD])
def test_round_trip_of_random_non_square_boxes_in_float32(std):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 50, 2, generator=g) * 100
    # Widths and heights from 4 to 200 px, drawn independently: aspect ratios far from 1 both ways.
    wh = 4 + torch.rand(2, 50, 2, generator=g) * 196  # ratios below decode's clamp (1000 / 16)
    refs, boxes = torch.cat((xy[0], xy[0] + wh[0]), 1), torch.cat((xy[1], xy[1] + wh[1]), 1)
    aspect = wh[..., 0] / wh[..., 1]
    assert aspect.min() < 0.2 and aspect.max() > 5
    back = decode(refs, encode(refs, boxes, std), std)
    assert torch.allclose(back, boxes, rtol=1e-5, atol=1e-3)
