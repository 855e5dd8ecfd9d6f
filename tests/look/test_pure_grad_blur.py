"""pure-grad's high-pass filter pads its blur as the ViCrop reference does (issue 14, item 4).

The reference blurs with torchvision's ``gaussian_blur`` (kernel 3, sigma 0.8): torch ``reflect``
padding, i.e. the pixel beyond the edge is the one *next to* the edge pixel (scipy ``mirror``),
not the edge pixel itself (scipy ``reflect``). The cases below are worked by hand from the
3-tap kernel ``[w1, w0, w1]``, ``w0 = 1 / (1 + 2e)``, ``w1 = e / (1 + 2e)``, ``e = exp(-1 / (2 * 0.8^2))``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from innersight.look.pure_grad import blur, edge_mask

E = math.exp(-1 / (2 * 0.8 ** 2))
W0, W1 = 1 / (1 + 2 * E), E / (1 + 2 * E)


def test_corner_impulse_blurs_as_the_reference_pads():
    image = np.zeros((3, 4, 5))
    image[:, 0, 0] = 1.0  # a bright corner pixel in every channel
    out = blur(image)
    # mirror padding: the pixels beyond the corner are image[1] / image[:, 1], both 0 here
    assert math.isclose(out[0, 0, 0], W0 * W0, rel_tol=1e-9)
    assert math.isclose(out[1, 0, 1], W0 * W1, rel_tol=1e-9)  # one step right
    assert math.isclose(out[2, 1, 1], W1 * W1, rel_tol=1e-9)  # one step diagonal
    assert out[0, 0, 2] == 0.0 and out[0, 2, 0] == 0.0  # outside the 3x3 support
    # scipy's "reflect" would repeat the corner: (w0 + w1)^2 there (the former behaviour)
    assert not math.isclose(out[0, 0, 0], (W0 + W1) ** 2, rel_tol=1e-3)


def test_edge_ramp_by_hand():
    row = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    image = np.broadcast_to(row, (3, 3, 5)).copy()  # constant down the columns: only the row blur acts
    out = blur(image)[0, 1]
    expected = [W0 * 3 + 2 * W1 * 1,  # left edge: the padded pixel is row[1] = 1
                W1 * 3 + W0 * 1 + W1 * 4,
                W1 * 1 + W0 * 4 + W1 * 1,
                W1 * 4 + W0 * 1 + W1 * 5,
                W0 * 5 + 2 * W1 * 1]  # right edge: the padded pixel is row[3] = 1
    np.testing.assert_allclose(out, expected, rtol=1e-9)


def test_blur_equals_torch_reflect_padding_with_the_same_kernel():
    """torch's ``reflect`` pad + the 3x3 Gaussian (what torchvision's gaussian_blur computes)."""
    rng = np.random.default_rng(0)
    image = rng.random((3, 9, 7))
    k1 = torch.tensor([W1, W0, W1], dtype=torch.float64)
    kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3)  # [C, 1, 3, 3]
    padded = torch.nn.functional.pad(torch.from_numpy(image)[None], (1, 1, 1, 1), mode="reflect")
    expected = torch.nn.functional.conv2d(padded, kernel, groups=3)[0].numpy()
    np.testing.assert_allclose(blur(image), expected, rtol=1e-9, atol=1e-12)


def test_edge_mask_is_the_reference_pipeline():
    """image - blur (torch reflect padding), channel L2 norm, 7x7 median (scipy default mode),
    above the spatial median; a flat region never passes."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    image = np.zeros((3, 20, 20))
    image[:, :, :12] = rng.random((3, 20, 12))  # texture on the left, flat on the right
    k1 = torch.tensor([W1, W0, W1], dtype=torch.float64)
    kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3)
    padded = torch.nn.functional.pad(torch.from_numpy(image)[None], (1, 1, 1, 1), mode="reflect")
    low = torch.nn.functional.conv2d(padded, kernel, groups=3)[0].numpy()
    high = np.sqrt(((image - low) ** 2).sum(axis=0))
    smooth = ndimage.median_filter(high, size=7)
    mask = edge_mask(image)
    np.testing.assert_array_equal(mask, smooth > np.median(smooth))
    assert not mask[:, 16:].any()
