"""Sample grids put each row where the README says."""

import numpy as np
from PIL import Image

from faceage_jax import samples


def test_grid_rows_follow_the_documented_order_whatever_the_dict_order():
    # Each row is a constant image whose value encodes its position in ROWS.
    values = {name: -1.0 + 0.4 * index for index, name in enumerate(samples.ROWS)}
    rows = {name: np.full((3, 4, 4, 3), values[name], np.float32) for name in sorted(values)}
    grid = samples.to_grid(rows)
    assert grid.shape == (6 * 4, 3 * 4, 3) and grid.dtype == np.uint8
    band_values = [int(grid[4 * index, 0, 0]) for index in range(6)]
    # (v + 1) * 127.5 rounded: -1 -> 0, -0.6 -> 51, ..., 1 -> 255.
    assert band_values == [0, 51, 102, 153, 204, 255]


def test_png_is_written_under_the_step_number(tmp_path):
    grid = np.zeros((8, 8, 3), np.uint8)
    path = samples.write_png(tmp_path / "samples", 1200, grid)
    assert path.name == "step_00001200.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
