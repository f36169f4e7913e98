"""Demo: synthetic faces (generated on first use), a small model at 64x64, CPU minutes.

Run (what `make demo` does):
  python -m faceage_jax.main --config configs/demo.py --workdir workdir/demo

Same architecture and losses as the default config, scaled down: ngf/ndf 16,
6 residual blocks, 64x64 images, global batch 4, six epochs (~960 steps), and
the identity loss weighted 1.0 instead of 0.5. It leaves checkpoints,
TensorBoard logs and sample grids in the workdir; by the end the aged faces
have grey hair, wrinkles and paler skin, with noise left and the backgrounds
somewhat changed: 960 steps is what ~4 minutes of 2 CPU cores train, and the
reference recipe needs more (README, "The demo's budget"). With ngf/ndf 32 and
7,200 steps (about an hour) every target of the demo is met: hair 82 % of the
way to old, skin CIEDE2000 7.0 / 5.9, border 8.2 / 9.8, cycle L1 0.074 / 0.047:
  python -m faceage_jax.main --config configs/demo.py --workdir workdir/demo7200 \
      --config.ngf=32 --config.ndf=32 --config.num_train_steps=7200 \
      --config.eval_every_steps=1200

Why each value differs from the default (configs/default.py):
- synthetic faces (2,000, in UTKFace's file format): UTKFace cannot be bundled.
  Their backdrops come from a palette of 8 colours (`synthetic.BACKDROPS`): after
  320 steps (ngf/ndf 32) the border's CIEDE2000 was 18.7 / 19.0 and the cycle L1
  0.152 / 0.152, against 25.3 / 25.3 and 0.196 / 0.204 with uniformly random
  backdrop colours.
- ngf/ndf 16, 6 blocks, 64x64: a short run learns more from more steps of a
  narrow network than from fewer of a wider one. ngf/ndf 16 runs ~16 images/s on
  2 cores against ~8 at ngf/ndf 32 (Intel Xeon, 2026-12-07), and in the same
  ~4.5 minutes of a run 1,000 steps of it ended at border CIEDE2000 15.4 / 16.9
  and cycle L1 0.119 / 0.114, where 320 steps at ngf/ndf 32 (the demo until
  then) ended at 18.6 / 19.1 and 0.152 / 0.151, and 500 at 17.5 / 17.9 and
  0.132 / 0.131. 32x32 was tried and learns less per step (border 17.8 vs 15.0,
  cycle L1 0.160 vs 0.160 after 1200 steps at ngf/ndf 32, uniform backdrops) at
  only ~2x the steps/s.
- batch 4: 4 images per step use the two cores better than 1; batch 1 for 4x the
  steps learned no faster per image (ngf/ndf 32, after 640 steps of batch 1:
  border 21.9, cycle L1 0.231; after 160 of batch 4: 20.2, 0.238).
- six epochs (3 + 3) instead of 100 + 100: the time budget (`make demo` ~6
  minutes). Eight (1,280 steps) made it ~6.5 minutes without the venv, for
  border 14.9 / 16.3 and cycle L1 0.114 / 0.104. Longer is cleaner (README,
  "The demo's budget").
- the learning rate stays 2e-4: 1e-3 over 320 steps (ngf/ndf 32) was worse
  (border 28.4 against 25.3, uniform backdrops), 5e-4 about the same (border 17.7 against
  18.7, cycle L1 0.141 against 0.152, one seed).
- identity loss 1.0 (of lambda_cycle; the reference's is 0.5): a small gain in
  keeping colours. The synthetic faces age by turning paler and greyer, and the
  generator learns that first as a brightening of the whole image, backdrop
  included; the identity loss is the reference's tool against such colour
  shifts. Over 960 steps, seeds 1 and 2: border CIEDE2000 16.0 / 17.0 and 14.9 /
  17.0 against 15.9 / 17.8 and 15.2 / 18.3 with 0.5, cycle L1 0.119 / 0.110 and
  0.123 / 0.106 against 0.120 / 0.116 and 0.123 / 0.113, hair 89 % and 86 % of
  the way to old against 91 % and 89 %. Over 1,280 steps: border 13.9 / 15.3
  against 14.9 / 16.3 (2.0: 13.8 / 15.0); in a 4,800-step run it was 0.1-1.5
  lower at each of four evaluations (README, "The demo's budget"). At ngf/ndf
  32 and 320 steps it had made no difference (18.8 / 18.5 against 18.7 / 19.0).
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

    config.ngf = 16
    config.ndf = 16
    config.n_res_blocks = 6

    config.batch_size = 4
    config.lambda_identity = 1.0
    # Three epochs (160 steps each: the larger domain's training faces / 4) at 2e-4, three
    # decaying to 0.
    config.num_epochs = 3
    config.num_decay_epochs = 3
    config.num_train_steps = -1

    config.log_every_steps = 20
    config.sample_every_steps = 160
    config.checkpoint_every_steps = 240
    config.keep_checkpoints_every_steps = 0
    # Evaluated at steps 240, 480, 720 and 960: TensorBoard's eval/ curves move over the run.
    # The first takes ~30 s (the real faces' readings, then cached), the others ~10 s.
    config.eval_every_steps = 240
    return config
