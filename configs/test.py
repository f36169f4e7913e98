"""Tiny config for tests: synthetic faces, 32x32, ngf/ndf 8, one residual block.

Run:
  python -m faceage_jax.main --config configs/test.py --workdir /tmp/faceage_test \
      --config.data_dir=/tmp/faceage_test/tfds
"""

import ml_collections

from faceage_jax import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.get_config()

    config.dataset = "synthetic"
    config.data_dir = "workdir/tensorflow_datasets"
    config.num_synthetic_faces = 200
    config.image_size = 32
    config.load_size = 36

    config.ngf = 8
    config.ndf = 8
    config.n_res_blocks = 1
    config.n_disc_layers = 2

    config.batch_size = 4
    config.pool_size = 4
    config.num_epochs = 1
    config.num_decay_epochs = 1
    config.num_train_steps = 6

    config.log_every_steps = 2
    config.sample_every_steps = 3
    config.num_sample_faces = 2
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    config.keep_checkpoints_every_steps = 0
    config.eval_every_steps = 0
    return config
