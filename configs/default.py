"""UTKFace at 128x128 with the reference CycleGAN hyperparameters.

Run:
  python -m faceage_jax.main --config configs/default.py --workdir workdir/utkface \
      --config.manual_dir=/path/to/UTKFace.tar.gz

The reference recipe is 100 epochs at a constant learning rate, then 100 with a
linear decay to zero, global batch 1, pool 50, lambda_cycle 10, identity 0.5.
Every field and its meaning: `faceage_jax/defaults.py`. To make a config of your
own, copy this file (or configs/demo.py) anywhere and override fields.
"""

import ml_collections

from faceage_jax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.get_config()
