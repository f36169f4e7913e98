"""Test-wide setup: 4 simulated CPU devices, TensorFlow kept off any accelerator, and
one persistent compilation cache for the whole suite and the processes it starts,
and XLA's fast-compile backend level.

Runs before any test module imports JAX or TensorFlow, so the settings take
effect before a backend is initialized. The cache is a fresh folder per run,
unless JAX_COMPILATION_CACHE_DIR names one (then runs reuse what it holds).

The tests' programs are tiny and each is run a few times, so compiling is most of
the suite's time: `--xla_backend_optimization_level=0` (LLVM's least optimization
of XLA:CPU's generated loops; the HLO passes, fusion among them, all still run)
makes the suite about 2x faster, its results equal to within the tests' tolerances.
A level in XLA_FLAGS is kept, so `XLA_FLAGS=--xla_backend_optimization_level=2
make test` runs the suite compiled as a training run is.
"""

import os
import shutil
import tempfile

# Must precede the first JAX backend initialization.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
OPT_LEVEL_FLAG = "--xla_backend_optimization_level"
if OPT_LEVEL_FLAG not in os.environ.get("XLA_FLAGS", ""):
    # Inherited by the subprocesses too.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_LEVEL_FLAG}=0".strip()
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    # Inherited by every subprocess the tests start: they compile the same steps.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="faceage_jax_test_cache_")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU")

NUM_TEST_DEVICES = 4


def pytest_sessionstart(session):
    assert jax.device_count() == NUM_TEST_DEVICES, (
        f"tests expect {NUM_TEST_DEVICES} simulated CPU devices, got {jax.devices()}; "
        "something initialized JAX before tests/conftest.py ran"
    )


def pytest_collection_modifyitems(session, config, items):
    # The slow tests first, so that the workers of `pytest -n 2` end together.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
    # pytest-xdist's workers inherit the folder from the main process, which removes it.
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
