"""Sample grids: fixed held-out faces aged, rejuvenated, and brought back by the cycle."""

import functools

import jax
import numpy as np
from etils import epath
from PIL import Image

from faceage_jax import cyclegan, models

# Grid rows, top to bottom. (jax returns dicts with sorted keys: order by this, not by them.)
ROWS = ("young", "young_to_old", "young_cycle", "old", "old_to_young", "old_cycle")


def translate(generator: models.ResnetGenerator, generator_params, faces):
    """{'young': [N,H,W,3], 'old': ...} -> rows of one grid, each [N, H, W, 3] in [-1, 1]."""
    aged = generator.apply(generator_params["young_to_old"], faces["young"])
    rejuvenated = generator.apply(generator_params["old_to_young"], faces["old"])
    return {
        "young": faces["young"],
        "young_to_old": aged,
        "young_cycle": generator.apply(generator_params["old_to_young"], aged),
        "old": faces["old"],
        "old_to_young": rejuvenated,
        "old_cycle": generator.apply(generator_params["young_to_old"], rejuvenated),
    }


def create_sampler(config):
    """A jitted `sampler(generator_params, faces) -> rows` (runs on every process)."""
    return jax.jit(functools.partial(translate, cyclegan.create_networks(config).generator))


def to_grid(rows: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of [N, H, W, 3] images in [-1, 1] -> one uint8 image [rows*H, N*W, 3].

    Row order: young, aged, young cycle, old, rejuvenated, old cycle.
    """
    lines = [np.concatenate(list(np.asarray(rows[name], np.float32)), axis=1) for name in ROWS]
    grid = np.concatenate(lines, axis=0)
    return np.round((np.clip(grid, -1, 1) + 1) * 127.5).astype(np.uint8)


def write_png(directory: epath.PathLike, step: int, grid: np.ndarray) -> epath.Path:
    """Writes `grid` as `directory/step_{step:08d}.png` (local or gs://)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.png"
    with path.open("wb") as file:
        Image.fromarray(grid).save(file, format="PNG")
    return path
