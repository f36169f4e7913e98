"""Runs the training loop of the test config in a separate process, for loop tests.

python tests/train_worker.py WORKDIR DATA_DIR NUM_STEPS PROCESS_ID NUM_PROCESSES PORT DEVICES DATA

DATA is 'pipeline' (the tf.data pipeline on synthetic faces) or 'random'
(`RandomBatches`: the same global batches whatever the process count). Process
0 writes WORKDIR/final_state.npz: every leaf of the final train state
(parameters, optimizer states, pools, RNG, step), the networks' outputs on
fixed images, and the next batch the data iterator would give. With
SLOW_DATA_SAVES=SECONDS in the environment, each save of the data position
waits that long first.
"""

import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

logging.set_verbosity(logging.INFO)  # Tests read what the run logs (on stderr).
logging.use_absl_handler()

workdir, data_dir = sys.argv[1:3]
num_steps, process_id, num_processes, port, devices = map(int, sys.argv[3:8])
data = sys.argv[8]
jax.config.update("jax_num_cpu_devices", devices)
if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

from configs import test as test_config  # noqa: E402
from faceage_jax import cyclegan, train  # noqa: E402
from input_pipeline import pipeline  # noqa: E402
from tests.random_batches import RandomBatches  # noqa: E402

config = test_config.get_config()
config.data_dir = data_dir
config.num_train_steps = num_steps
config.log_every_steps = 1
if data == "random":
    batches = RandomBatches(config.batch_size, config.image_size, process_id, num_processes)
else:
    batches = pipeline.create_train_iterator(train.prepare_data(config), config)
if os.environ.get("SLOW_DATA_SAVES"):
    # Widens the window in which a checkpoint is being written, for tests that kill then.
    save = batches.save
    batches.save = lambda directory: (
        time.sleep(float(os.environ["SLOW_DATA_SAVES"])),
        save(directory),
    )
state = train.train_and_evaluate(config, workdir, train_iterator=batches)
params = jax.device_get({**state.generator_params, **state.discriminator_params})
# What the networks compute on fixed images: biases that feed instance norm do not
# change it, so it is the measure of equality that their rounding noise cannot blur.
images = np.random.default_rng(123).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
generator, discriminator = cyclegan.create_networks(config)
generate, score = jax.jit(generator.apply), jax.jit(discriminator.apply)
outputs = {name: generate(params[name], images) for name in cyclegan.GENERATORS} | {
    f"{name}_scores": score(params[name], images) for name in cyclegan.DOMAINS
}
next_batch = next(batches)
# Every process takes part: the pools are sharded over the devices of all processes.
state = multihost_utils.process_allgather(state, tiled=True)
if jax.process_index() == 0:
    leaves = jax.tree.leaves_with_path(state)
    flat = {f"state{jax.tree_util.keystr(path)}": np.asarray(leaf) for path, leaf in leaves}
    flat |= {f"outputs/{name}": np.asarray(value) for name, value in outputs.items()}
    flat |= {f"next_batch/{name}": np.asarray(value) for name, value in next_batch.items()}
    np.savez(os.path.join(workdir, "final_state.npz"), **flat)
print("done", flush=True)
