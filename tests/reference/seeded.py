"""Seeded random FID-Inception weights and images, the same in NumPy and in PyTorch.

Imported by `make_inception_reference.py` (run by hand beside torch and
pytorch-fid) and by `tests/test_inception.py` (NumPy and Flax only), so that both
sides draw identical weights from `np.random.RandomState`, whose stream is
stable across NumPy versions. Keys and shapes are PyTorch's (kernels
[out, in, h, w]); they are drawn in sorted key order.
"""

import numpy as np

SEED = 20261203
IMAGE_SHAPE = (3, 75, 61, 3)  # [N, H, W, 3]: odd sizes, resized to 299 like any input.


def state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Weights that keep activations near unit scale through the 94 convolutions."""
    rng = np.random.RandomState(SEED)
    weights = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith("num_batches_tracked"):
            weights[key] = np.array(0, np.int64)
        elif key.endswith("conv.weight") or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            weights[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith(("bn.weight", "running_var")):
            weights[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # bn.bias, running_mean, fc.bias
            weights[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return weights


def images() -> np.ndarray:
    """[N, H, W, 3] float32 in [0, 1]."""
    return np.random.RandomState(SEED + 1).uniform(0, 1, IMAGE_SHAPE).astype(np.float32)
