"""Entry point: `python -m faceage_jax.main --config configs/<name>.py --workdir DIR`.

This file is intentionally kept short; the logic is in libraries that can be
tested and imported.
"""

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from clu import parameter_overview
from ml_collections import config_flags

from faceage_jax import models

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    images = jnp.zeros((1, config.image_size, config.image_size, 3))
    for name, module in [
        ("generator", models.create_generator(config)),
        ("discriminator", models.create_discriminator(config)),
    ]:
        params = module.init(jax.random.key(config.seed), images)
        logging.info("%s:\n%s", name, parameter_overview.get_parameter_overview(params))


if __name__ == "__main__":
    app.run(main)
