"""Test-wide setup: 4 simulated CPU devices, and TensorFlow kept off any accelerator.

Runs before any test module imports JAX or TensorFlow, so the settings take
effect before a backend is initialized.
"""

import os

# Must precede the first JAX backend initialization.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU")

NUM_TEST_DEVICES = 4


def pytest_sessionstart(session):
    assert jax.device_count() == NUM_TEST_DEVICES, (
        f"tests expect {NUM_TEST_DEVICES} simulated CPU devices, got {jax.devices()}; "
        "something initialized JAX before tests/conftest.py ran"
    )
