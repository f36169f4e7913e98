"""Demo: synthetic faces (generated on first use), a small model at 64x64, CPU minutes.

Run (what `make demo` does):
  python -m faceage_jax.main --config configs/demo.py --workdir workdir/demo

Same architecture and losses as the default config, scaled down: ngf/ndf 32,
6 residual blocks, 64x64 images, global batch 4, two epochs (~320 steps). It
leaves checkpoints, TensorBoard logs and sample grids in the workdir; by the
end the aged faces have grey hair, wrinkles and paler skin, but are noisy, and
the backgrounds have changed: 320 steps is what ~3-4 minutes of 2 CPU cores train,
and the reference recipe needs more (README, "The demo's budget").

Why each value differs from the default (configs/default.py):
- synthetic faces (2,000, in UTKFace's file format): UTKFace cannot be bundled.
  Their backdrops come from a palette of 8 colours (`synthetic.BACKDROPS`): after
  320 steps the border's CIEDE2000 is 18.7 / 19.0 and the cycle L1 0.152 / 0.152,
  against 25.3 / 25.3 and 0.196 / 0.204 with uniformly random backdrop colours.
- 64x64 and ngf/ndf 32, 6 blocks: 22 GFLOP per image instead of 469, ~7 images/s
  on 2 cores. 32x32 was tried and learns less per step (border CIEDE2000 17.8 vs
  15.0, cycle L1 0.160 vs 0.160 after 1200 steps, uniform backdrops) at only ~2x
  the steps/s.
- batch 4: 4 images per step use the two cores better than 1; batch 1 for 4x the
  steps learned no faster per image (after 640 steps of batch 1: border 21.9,
  cycle L1 0.231; after 160 of batch 4: 20.2, 0.238).
- two epochs (1 + 1) instead of 100 + 100: the time budget (`make demo` ~5.5
  minutes). Longer is cleaner (README, "The demo's budget"):
  `--config.num_train_steps=2400` (~25 minutes) brings the cycle L1 to 0.089 /
  0.067 and the skin's CIEDE2000 to 8.8 / 7.5; the border's stays 10.7 / 11.5
  (ideal aging, each face redrawn old, gives 6.6).
- the learning rate stays 2e-4: 1e-3 over the same 320 steps was worse (border
  28.4 against 25.3, uniform backdrops), 5e-4 about the same (border 17.7 against
  18.7, cycle L1 0.141 against 0.152, one seed).
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
