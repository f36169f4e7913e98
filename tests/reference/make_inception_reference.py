"""Writes pytorch-fid's outputs on seeded weights, for `tests/test_inception.py`. Run by hand.

Needs torch, torchvision and pytorch-fid, which never enter the project's venv:

    python3.11 -m venv /tmp/torchref
    /tmp/torchref/bin/pip install torch==2.14.1 torchvision==0.29.1 scipy
    /tmp/torchref/bin/pip install --no-deps pytorch-fid==0.3.0
    /tmp/torchref/bin/python tests/reference/make_inception_reference.py

(pytorch-fid imports torchvision, and PyPI's torchvision does not load beside
the CPU torch 2.13.0 wheel, hence 2.14.1 with its torchvision.) Writes, in this
folder, only outputs and tiny files, never the weights:

- inception_features.npz: pytorch-fid's 2048-d pool features of `seeded.images()`
  with the weights `seeded.state_dict(...)` (its own `fid_inception_v3`, with the
  weights handed to its loader instead of the download), and its
  `calculate_frechet_distance` of two small feature sets.
- small_zip.pth, small_legacy.pth: one small state dict saved by torch.save in
  both formats (float32, float16, int64, a transposed and an offset view), and
  small_expected.npz with the arrays they hold.
"""

import pathlib
import sys

import numpy as np
import torch
from pytorch_fid import fid_score, inception

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import seeded  # noqa: E402


def main():
    torch.set_num_threads(2)
    # The key layout and shapes of the FID network, from pytorch-fid itself.

    def load_seeded(url, progress=True):
        del url, progress
        return {key: torch.from_numpy(value) for key, value in weights.items()}

    skeleton = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in {
        "Mixed_5b": inception.FIDInceptionA(192, pool_features=32),
        "Mixed_5c": inception.FIDInceptionA(256, pool_features=64),
        "Mixed_5d": inception.FIDInceptionA(288, pool_features=64),
        "Mixed_6b": inception.FIDInceptionC(768, channels_7x7=128),
        "Mixed_6c": inception.FIDInceptionC(768, channels_7x7=160),
        "Mixed_6d": inception.FIDInceptionC(768, channels_7x7=160),
        "Mixed_6e": inception.FIDInceptionC(768, channels_7x7=192),
        "Mixed_7b": inception.FIDInceptionE_1(1280),
        "Mixed_7c": inception.FIDInceptionE_2(2048),
    }.items():
        setattr(skeleton, name, block)
    shapes_seen = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    weights = seeded.state_dict(shapes_seen)
    inception.load_state_dict_from_url = load_seeded
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    images = torch.from_numpy(seeded.images()).permute(0, 3, 1, 2)
    with torch.no_grad():
        (features,) = model(images)
    features = features[:, :, 0, 0].numpy()
    rng = np.random.RandomState(seeded.SEED + 2)
    x, y = rng.standard_normal((50, 8)), rng.standard_normal((60, 8)) + 0.3
    frechet = fid_score.calculate_frechet_distance(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    )
    np.savez_compressed(
        HERE / "inception_features.npz",
        features=features.astype(np.float32),
        state_dict_keys=np.array(sorted(shapes_seen)),
        frechet_x=x,
        frechet_y=y,
        frechet=np.float64(frechet),
    )
    print("features", features.shape, "mean", features.mean(), "std", features.std())

    storage = torch.arange(20, dtype=torch.float32)
    small = {
        "layer.conv.weight": torch.from_numpy(
            np.random.RandomState(1).standard_normal((2, 3, 3, 3)).astype(np.float32)
        ),
        "layer.bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "half": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "transposed": storage[:12].reshape(3, 4).t(),
        "offset_view": storage[5:11],
    }
    torch.save(small, HERE / "small_zip.pth")
    torch.save(small, HERE / "small_legacy.pth", _use_new_zipfile_serialization=False)
    np.savez(HERE / "small_expected.npz", **{k: v.numpy() for k, v in small.items()})


if __name__ == "__main__":
    main()
