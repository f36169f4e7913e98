"""Entry point: `python -m faceage_jax.main --config configs/<name>.py --workdir DIR`.

This file is intentionally kept short; the logic is in libraries that can be
tested and imported.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from faceage_jax import runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (or gs://).")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(config) -> None:
    """Joins a multi-process job before any device is touched, when one is configured.

    Explicit: config.coordinator_address (+ num_processes, process_id), or the
    JAX_COORDINATOR_ADDRESS environment (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID).
    Detected: a multi-host Cloud TPU VM (TPU_WORKER_HOSTNAMES lists several hosts).
    """
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        num_processes = config.num_processes
        if num_processes < 0:
            num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "-1"))
        process_id = config.process_id
        if process_id < 0:
            process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
        if num_processes < 1 or process_id < 0:
            raise app.UsageError(
                f"Coordinator {address} given, but not the process count and id: set "
                "--config.num_processes and --config.process_id (or JAX_NUM_PROCESSES and "
                "JAX_PROCESS_ID)."
            )
        jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # Cloud TPU pod slice: JAX finds its peers.


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runtime.LibraryInfoFilter())
    config = FLAGS.config
    runtime.choose_xla_cpu_scheduler(config)  # Before JAX starts its backends.
    initialize_distributed(config)
    # TensorFlow (input pipeline only) must not take accelerator memory from JAX.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")

    from faceage_jax import cyclegan, train

    if cyclegan.compiler_options(config):
        # Writing the step with oneDNN calls to the cache fails (std::bad_alloc, jax 0.12);
        # off even where JAX_COMPILATION_CACHE_DIR names one.
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info(
            "No persistent compilation cache: the bfloat16 step on a CPU calls oneDNN, "
            "which XLA fails to save; a restarted run compiles again."
        )
    else:
        runtime.enable_compilation_cache(train.absolute_path(FLAGS.workdir) / "compilation_cache")
    logging.info(
        "Process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    train.train_and_evaluate(config, FLAGS.workdir)


def run():
    """`python -m faceage_jax.main` and the console script `faceage-train`."""
    runtime.reexec_with_huge_pages()  # Before flags are read; does not return if it restarts.
    app.run(main)


if __name__ == "__main__":
    run()
