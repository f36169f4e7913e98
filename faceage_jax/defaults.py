"""The default training config: every field, its default, and what it means.

UTKFace at 128x128 with the reference CycleGAN hyperparameters: 100 epochs at a
constant learning rate, then 100 with a linear decay to zero, global batch 1,
pool 50, lambda_cycle 10, identity 0.5. It ships inside the package, so the
config files (`configs/*.py` in the repository, or a copy of one anywhere)
start from it with `from faceage_jax import defaults`, and every config is
checked against its fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data.
    config.dataset = "utk_face"  # 'utk_face' (real UTKFace) or 'synthetic' (generated faces).
    config.data_dir = ""  # TFDS data dir (local or gs://); '' means TFDS's default.
    config.manual_dir = ""  # UTKFace.tar.gz or its extracted folder; needed on first build.
    config.num_synthetic_faces = 0  # Only for dataset='synthetic': how many faces to generate.
    config.test_share = 0.1  # Share of faces held out (split by a hash of the file name).
    # Domains by age, inclusive: young (A) and old (B, the original project's "after 60").
    config.young_age_min = 18
    config.young_age_max = 29
    config.old_age_min = 60
    config.old_age_max = 116
    config.image_size = 128  # Training resolution; a multiple of 4 (2**n_downsample).
    config.load_size = 143  # Resize before the random crop (the reference's 286/256 ratio).

    # Networks (canonical CycleGAN: ResNet generator, 70x70 PatchGAN).
    config.ngf = 64
    config.ndf = 64
    config.n_res_blocks = 9
    config.n_downsample = 2
    config.n_disc_layers = 3
    # 'float32' or 'bfloat16' (bf16 convolutions; float32 params and norm statistics).
    config.compute_dtype = "float32"
    # How the residual blocks' 3x3 convolutions run (same parameters, same results):
    # 'winograd' (4x fewer multiplications, faster on CPUs), 'direct' (XLA's convolution,
    # for GPUs/TPUs and their libraries), or 'auto': winograd on CPU in float32.
    config.residual_convs = "auto"

    # Optimization.
    config.batch_size = 1  # Global batch over all devices of all hosts.
    config.learning_rate = 2e-4
    config.adam_b1 = 0.5
    config.adam_b2 = 0.999
    config.num_epochs = 100  # Epochs at the constant learning rate.
    config.num_decay_epochs = 100  # Then a linear decay to zero over this many epochs.
    # -1: (num_epochs + num_decay_epochs) * steps per epoch. N: the run, and the schedule in
    # the epochs' proportions, span N steps.
    config.num_train_steps = -1
    config.lambda_cycle = 10.0
    config.lambda_identity = 0.5  # Relative to lambda_cycle; 0 skips the identity passes.
    config.pool_size = 50  # History of generated images per domain; 0 disables it.
    config.seed = 0
    config.parallelism = "shard_map"  # 'shard_map' (default) or 'pmap'.

    # Logging, samples, checkpoints.
    config.log_every_steps = 100
    config.sample_every_steps = 2000
    config.num_sample_faces = 8  # Fixed held-out faces per domain in the sample grids.
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 3  # The newest N are kept...
    config.keep_checkpoints_every_steps = 20000  # ...and every K steps forever (0: none).

    # Evaluation on held-out faces (`python -m faceage_jax.evaluate`, README "Evaluation").
    config.eval_every_steps = 50000  # Also evaluate during training every N steps; 0: never.
    config.eval_num_faces = -1  # Held-out faces per domain to evaluate; -1: all of them.
    config.eval_bootstrap_resamples = 100  # For the 95 % intervals; 0: no intervals.
    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its .npz); '': no FID/KID.
    config.inception_weights = ""

    # Multi-host (jax.distributed); empty/-1 means detect (TPU VM) or single process.
    config.coordinator_address = ""
    config.num_processes = -1
    config.process_id = -1

    return config
