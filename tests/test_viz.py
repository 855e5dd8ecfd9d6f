"""Map resampling onto the original image's pixels."""

from __future__ import annotations

import numpy as np

from innersight.viz import map_to_image_grid, normalise


def test_map_covers_only_its_region():
    imap = np.array([[1.0, 2.0], [3.0, 4.0]])
    # region x in [2, 6), y in [0, 4) on a 8x4 image: 2x2 px cells, NaN outside
    grid = map_to_image_grid(imap, (2.0, 0.0, 6.0, 4.0), (8, 4))
    assert grid.shape == (4, 8)
    assert np.isnan(grid[:, :2]).all() and np.isnan(grid[:, 6:]).all()
    np.testing.assert_array_equal(grid[:, 2:6], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])


def test_normalise_ignores_nan_and_constant_maps():
    out = normalise(np.array([np.nan, 2.0, 4.0]))
    assert np.isnan(out[0]) and out[1] == 0.0 and out[2] == 1.0
    assert np.all(normalise(np.ones(3)) == 0)


def _two_colour_image():
    from PIL import Image

    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40] = (200, 30, 40)  # red left half
    pixels[:, 40:] = (30, 160, 60)  # green right half
    return Image.fromarray(pixels)


def test_spotlight_keeps_the_colours_where_the_map_is_high_and_the_hue_everywhere():
    from innersight.viz import SPOTLIGHT_FLOOR, spotlight

    image = _two_colour_image()
    out = spotlight(image, np.array([[1.0, 0.0]]), (0.0, 0.0, 80.0, 40.0)).astype(int)  # [H, W, 3]
    assert (out[:, :40] == (200, 30, 40)).all()  # the attended half: the image's own pixels
    np.testing.assert_allclose(out[:, 40:], np.rint(np.array([30, 160, 60]) * SPOTLIGHT_FLOOR)
                               * np.ones((40, 40, 1)), atol=0)  # dimmed, same hue
    outside = spotlight(image, np.array([[1.0]]), (0.0, 0.0, 40.0, 40.0)).astype(int)
    assert (outside[:, 40:] == np.rint(np.array([30, 160, 60]) * SPOTLIGHT_FLOOR)).all()  # not seen: dim


def test_maps_have_a_colour_scale_in_both_styles():
    from innersight.viz import MAP_CMAP, draw_map, pyplot

    plt = pyplot()
    for style in ("spotlight", "heat"):
        fig, ax = plt.subplots()
        artist = draw_map(ax, _two_colour_image(), np.array([[0.2, 0.9]]), (0.0, 0.0, 80.0, 40.0), style=style)
        assert len(fig.axes) == 2 and fig.axes[1].get_ylabel()  # the colour bar, labelled
        assert artist.get_clim() == (0, 1)
        if style == "heat":
            assert artist.get_cmap().name == MAP_CMAP
        plt.close(fig)


def test_explain_figure_shows_the_image_in_its_own_colours(tmp_path):
    from PIL import Image

    from innersight.viz import explain_figure

    image = _two_colour_image().resize((160, 80), Image.NEAREST)
    path = explain_figure(image, np.array([[1.0, 0.0]]), (0.0, 0.0, 160.0, 80.0), (0.0, 0.0, 80.0, 80.0),
                          image.crop((80, 0, 160, 80)), question="what colour is the left half?",
                          answers=[("plain", "red")], method="vicrop-rel-att", model="m", path=tmp_path / "e.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    exact_red = (pixels == (200, 30, 40)).all(axis=1).sum()
    # the crop is green, so the red comes from the map panel: the attended half is shown untouched
    assert exact_red > 40 * 40
