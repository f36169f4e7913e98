"""Runs the training loop of the test config in a separate process, for loop tests.

python tests/train_worker.py WORKDIR DATA_DIR NUM_STEPS PROCESS_ID NUM_PROCESSES PORT DEVICES DATA

DATA is 'pipeline' (the tf.data pipeline on synthetic faces) or 'random'
(`RandomBatches`: the same global batches whatever the process count). Process
0 writes the final parameters, and the networks' outputs on fixed images, to
WORKDIR/final_params.npz.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

workdir, data_dir = sys.argv[1:3]
num_steps, process_id, num_processes, port, devices = map(int, sys.argv[3:8])
data = sys.argv[8]
jax.config.update("jax_num_cpu_devices", devices)
if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

from configs import test as test_config  # noqa: E402
from faceage_jax import cyclegan, models, train  # noqa: E402
from tests.random_batches import RandomBatches  # noqa: E402

config = test_config.get_config()
config.data_dir = data_dir
config.num_train_steps = num_steps
config.log_every_steps = 1
batches = None
if data == "random":
    batches = RandomBatches(config.batch_size, config.image_size, process_id, num_processes)
state = train.train_and_evaluate(config, workdir, train_iterator=batches)
params = jax.device_get({**state.generator_params, **state.discriminator_params})
# What the networks compute on fixed images: biases that feed instance norm do not
# change it, so it is the measure of equality that their rounding noise cannot blur.
images = np.random.default_rng(123).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
generator = models.create_generator(config)
discriminator = models.create_discriminator(config)
outputs = {name: generator.apply(params[name], images) for name in cyclegan.GENERATORS} | {
    f"{name}_scores": discriminator.apply(params[name], images) for name in cyclegan.DOMAINS
}
if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree.leaves_with_path(params)}
    flat |= {f"outputs/{name}": np.asarray(value) for name, value in outputs.items()}
    np.savez(os.path.join(workdir, "final_params.npz"), **flat)
print("done", flush=True)
