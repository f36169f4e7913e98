"""Config rules: each bad value is refused with a message that says what to change."""

import pytest

from faceage_jax import config_validation
from tests.helpers import make_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"learning_rate": -1e-4}, "learning_rate must be positive"),
        ({"image_size": 30}, "multiple of 4"),
        ({"image_size": 8}, "at least 12"),
        ({"load_size": 16}, "load_size=16 must be >= image_size=32"),
        ({"young_age_min": 30, "young_age_max": 20}, "young age range"),
        ({"old_age_min": 25}, "age ranges overlap"),
        ({"parallelism": "pjit"}, "parallelism"),
        ({"compute_dtype": "float16"}, "bfloat16"),
        ({"residual_convs": "fft"}, "winograd"),
        ({"dataset": "imagenet"}, "'utk_face' .* or 'synthetic'"),
        ({"num_synthetic_faces": 0}, "num_synthetic_faces > 0"),
        ({"test_share": 1.0}, r"test_share must lie in \(0, 1\)"),
        ({"checkpoint_every_steps": 0}, "checkpoint_every_steps=0: it must be at least 1"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0: at least the newest"),
        ({"keep_checkpoints_every_steps": -1}, "or 0 to keep only the newest"),
        ({"num_train_steps": 0}, "num_train_steps must be positive"),
        ({"eval_every_steps": -1}, "or 0 to evaluate only with"),
        ({"eval_num_faces": 2}, "at least 3 held-out faces"),
        ({"eval_num_faces": 0}, "or -1 for all of them"),
        ({"eval_bootstrap_resamples": 5}, "at least 10 resamples"),
        ({"eval_bootstrap_resamples": -1}, "use 0 .no intervals."),
    ],
)
def test_bad_config_value_is_rejected_with_a_clear_message(overrides, message):
    config = make_config(**overrides)
    with pytest.raises(ValueError, match=message):
        config_validation.validate(config)


def test_unknown_config_field_is_named():
    config = make_config()
    config.batchsize = 8
    with pytest.raises(config_validation.ConfigError, match="batchsize"):
        config_validation.validate(config)


def test_test_and_demo_and_default_configs_are_valid():
    from configs import default, demo
    from configs import test as test_config

    for module in (default, demo, test_config):
        config_validation.validate(module.get_config())


def test_batch_not_divisible_by_devices_or_processes_is_rejected_with_advice():
    with pytest.raises(config_validation.ConfigError, match="multiple of the number of devices"):
        config_validation.validate(make_config(batch_size=6), num_devices=4)
    with pytest.raises(config_validation.ConfigError, match="number of processes"):
        config_validation.validate(make_config(batch_size=6), num_processes=4)
