"""Every rule a config must follow, checked before anything is built or compiled.

The one home of config rules: the modules that read a config trust it. Every
error is a `ConfigError` that names the field, the value, what is expected, and
how to fix it.
"""

import ml_collections

from faceage_jax import cyclegan, defaults, parallel


class ConfigError(ValueError):
    """A config value the training job cannot run with."""


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    num_processes: int | None = None,
) -> None:
    """Raises ConfigError on the first problem found in `config`.

    With `num_devices` and `num_processes` (all of the job's), also checks that
    the global batch divides over them.
    """
    _check_known_keys(config)
    _check_positive(config)
    _check_checkpoints(config)
    _check_choices(config)
    _check_image_size(config)
    _check_age_ranges(config)
    _check_evaluation(config)
    for count, what in [(num_devices, "devices"), (num_processes, "processes")]:
        if count is not None and config.batch_size % count:
            raise ConfigError(
                f"config.batch_size={config.batch_size} (the global batch) must be a multiple "
                f"of the number of {what} ({count}); set --config.batch_size to a multiple "
                f"of {count}."
            )


def _check_known_keys(config: ml_collections.ConfigDict) -> None:
    known = set(defaults.get_config().keys())
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise ConfigError(
            f"Unknown config field(s) {unknown}. Known fields are those of "
            f"faceage_jax/defaults.py: {sorted(known)}. Check the spelling."
        )
    missing = sorted(known - set(config.keys()))
    if missing:
        raise ConfigError(
            f"Config lacks field(s) {missing}; start configs from "
            "faceage_jax.defaults.get_config() and override fields."
        )


def _check_positive(config: ml_collections.ConfigDict) -> None:
    for name in [
        "batch_size",
        "learning_rate",
        "image_size",
        "load_size",
        "ngf",
        "ndf",
        "n_disc_layers",
        "log_every_steps",
        "sample_every_steps",
        "num_sample_faces",
    ]:
        if not config[name] > 0:
            raise ConfigError(f"config.{name} must be positive, got {config[name]!r}.")
    for name in [
        "n_res_blocks",
        "n_downsample",
        "pool_size",
        "lambda_cycle",
        "lambda_identity",
        "num_epochs",
        "num_decay_epochs",
    ]:
        if not config[name] >= 0:
            raise ConfigError(f"config.{name} must be >= 0, got {config[name]!r}.")
    if config.num_train_steps == 0 or config.num_train_steps < -1:
        raise ConfigError(
            f"config.num_train_steps must be positive, or -1 for (num_epochs + "
            f"num_decay_epochs) epochs; got {config.num_train_steps}."
        )
    if config.num_train_steps == -1 and config.num_epochs + config.num_decay_epochs == 0:
        raise ConfigError(
            "config.num_train_steps=-1 counts steps from the epochs, but num_epochs + "
            "num_decay_epochs is 0: set one of them, or num_train_steps."
        )
    if not 0 < config.test_share < 1:
        raise ConfigError(f"config.test_share must lie in (0, 1), got {config.test_share}.")
    if not 0 < config.adam_b1 < 1 or not 0 < config.adam_b2 < 1:
        raise ConfigError(
            f"config.adam_b1 and adam_b2 must lie in (0, 1), got {config.adam_b1}, "
            f"{config.adam_b2}."
        )


def _check_checkpoints(config: ml_collections.ConfigDict) -> None:
    if not config.checkpoint_every_steps >= 1:
        raise ConfigError(
            f"config.checkpoint_every_steps={config.checkpoint_every_steps}: it must be at least "
            "1 (the number of steps between checkpoints)."
        )
    if not config.keep_checkpoints >= 1:
        raise ConfigError(
            f"config.keep_checkpoints={config.keep_checkpoints}: at least the newest checkpoint "
            "must be kept for training to resume; set it to 1 or more."
        )
    if not config.keep_checkpoints_every_steps >= 0:
        raise ConfigError(
            f"config.keep_checkpoints_every_steps={config.keep_checkpoints_every_steps}: use a "
            "positive number of steps, or 0 to keep only the newest checkpoints."
        )


def _check_choices(config: ml_collections.ConfigDict) -> None:
    if config.compute_dtype not in cyclegan.COMPUTE_DTYPES:
        raise ConfigError(
            f"config.compute_dtype={config.compute_dtype!r} is not supported; "
            f"use one of {sorted(cyclegan.COMPUTE_DTYPES)}."
        )
    if config.residual_convs not in cyclegan.RESIDUAL_CONVS:
        raise ConfigError(
            f"config.residual_convs={config.residual_convs!r} is not supported; "
            f"use one of {list(cyclegan.RESIDUAL_CONVS)}."
        )
    if config.parallelism not in parallel.PARALLELISMS:
        raise ConfigError(
            f"config.parallelism={config.parallelism!r}; use one of {parallel.PARALLELISMS}."
        )
    if config.dataset not in ("utk_face", "synthetic"):
        raise ConfigError(
            f"config.dataset={config.dataset!r}; use 'utk_face' (UTKFace, see README) or "
            "'synthetic' (generated faces)."
        )
    if config.dataset == "synthetic" and config.num_synthetic_faces <= 0:
        raise ConfigError(
            "config.dataset='synthetic' needs config.num_synthetic_faces > 0, got "
            f"{config.num_synthetic_faces}."
        )


def smallest_image_size(config: ml_collections.ConfigDict) -> int:
    """The smallest size both networks take: the PatchGAN must leave a 1x1 score map."""
    stride = 2 ** max(config.n_downsample, config.n_disc_layers)
    size = stride
    # Each stride-2 conv (kernel 4, padding 1) halves; the two stride-1 convs take 1 each.
    while size // 2**config.n_disc_layers - 2 < 1:
        size += stride
    return size


def _check_image_size(config: ml_collections.ConfigDict) -> None:
    multiple = 2**config.n_downsample
    smallest = smallest_image_size(config)
    if config.image_size % multiple or config.image_size < smallest:
        raise ConfigError(
            f"config.image_size={config.image_size} cannot go through the networks: it must "
            f"be a multiple of {multiple} (2**n_downsample) and at least {smallest} (for "
            f"n_disc_layers={config.n_disc_layers}). 128 and 256 are the usual sizes."
        )
    if config.load_size < config.image_size:
        raise ConfigError(
            f"config.load_size={config.load_size} must be >= image_size={config.image_size}: "
            "images are resized to load_size, then randomly cropped to image_size."
        )


def _check_age_ranges(config: ml_collections.ConfigDict) -> None:
    young = (config.young_age_min, config.young_age_max)
    old = (config.old_age_min, config.old_age_max)
    for name, (low, high) in [("young", young), ("old", old)]:
        if low > high or low < 0:
            raise ConfigError(
                f"The {name} age range [{low}, {high}] is empty or negative: set "
                f"config.{name}_age_min <= config.{name}_age_max, both >= 0."
            )
    if young[0] <= old[1] and old[0] <= young[1]:
        raise ConfigError(
            f"The age ranges overlap: young [{young[0]}, {young[1]}] and old "
            f"[{old[0]}, {old[1]}]; a face must belong to one domain only."
        )


def _check_evaluation(config: ml_collections.ConfigDict) -> None:
    if not config.eval_every_steps >= 0:
        raise ConfigError(
            f"config.eval_every_steps={config.eval_every_steps}: use a positive number of steps "
            "between evaluations during training, or 0 to evaluate only with "
            "`python -m faceage_jax.evaluate`."
        )
    if config.eval_num_faces != -1 and not config.eval_num_faces >= 3:
        raise ConfigError(
            f"config.eval_num_faces={config.eval_num_faces}: evaluate at least 3 held-out faces "
            "per domain, or -1 for all of them."
        )
    if not config.eval_bootstrap_resamples >= 0 or 0 < config.eval_bootstrap_resamples < 10:
        raise ConfigError(
            f"config.eval_bootstrap_resamples={config.eval_bootstrap_resamples}: use 0 (no "
            "intervals) or at least 10 resamples (100 is the default)."
        )
