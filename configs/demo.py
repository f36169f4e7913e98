"""Demo: synthetic faces (generated on first use), a small model at 64x64, CPU minutes.

Run (what `make demo` does):
  python -m faceage_jax.main --config configs/demo.py --workdir workdir/demo

Same architecture and losses as the default config, scaled down: ngf/ndf 32,
6 residual blocks, 64x64 images, global batch 4, two epochs (~320 steps). It
leaves checkpoints, TensorBoard logs and sample grids in the workdir; by the
end the aged faces have grey hair and paler skin.
"""

import ml_collections

from faceage_jax import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.get_config()

    config.dataset = "synthetic"
    config.data_dir = "workdir/tensorflow_datasets"
    config.num_synthetic_faces = 2000
    config.image_size = 64
    config.load_size = 72  # 64 * 286 / 256, rounded.

    config.ngf = 32
    config.ndf = 32
    config.n_res_blocks = 6

    config.batch_size = 4
    # One epoch (the ~630 old training faces / 4: ~157 steps) at 2e-4, one decaying to 0.
    config.num_epochs = 1
    config.num_decay_epochs = 1
    config.num_train_steps = -1

    config.log_every_steps = 20
    config.sample_every_steps = 100
    config.checkpoint_every_steps = 100
    config.keep_checkpoints_every_steps = 0
    # Evaluated at steps 80, 160, 240 and 320: TensorBoard's eval/ curves move over the run.
    # The first takes ~30 s (the real faces' readings, then cached), the others ~10 s.
    config.eval_every_steps = 80
    return config
