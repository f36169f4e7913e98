"""Speed of a full held-out evaluation: N faces per domain at the config's size.

Run:
  python -m faceage_jax.evaluate_bench --config configs/default.py --num_faces 1000
      [--workdir /tmp/faceage_eval_bench] [--config.inception_weights=PATH]

Builds synthetic faces with half of them held out (enough for `num_faces` per
domain in the test split and in the train split), initializes the config's
generators (their values do not change the cost), and runs `evaluate.evaluate`
twice: cold (nothing cached) and warm (the real faces' face-model readings and
Inception features cached, as in a training run's second evaluation). Prints
the seconds of each stage and the faces/s of each measure. Without
`inception_weights` it times the Inception on seeded random weights of the
right shapes (their values do not change the cost either).
"""

import math
import time

import jax
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from faceage_jax import config_validation, cyclegan, evaluate, runtime
from faceage_jax.metrics import inception

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
flags.DEFINE_integer("num_faces", 1000, "Held-out faces per domain.")
flags.DEFINE_string("workdir", "/tmp/faceage_eval_bench", "Where the faces and reports go.")
flags.mark_flags_as_required(["config"])

HELD_OUT_SHARE = 0.5


def random_inception_weights(path: epath.Path) -> None:
    rng = np.random.RandomState(0)
    state_dict = inception.state_dict_from_variables(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), inception.expected_variables())
    )
    for key, value in state_dict.items():
        if key.endswith("running_var"):
            state_dict[key] = np.ones_like(value)
        elif value.ndim:
            state_dict[key] = (rng.standard_normal(value.shape) * 0.05).astype(np.float32)
    np.savez(path, **state_dict)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    config = FLAGS.config.copy_and_resolve_references()
    workdir = epath.Path(FLAGS.workdir)
    # Synthetic faces: 35 % young and 35 % old, half of them held out (+25 % margin:
    # the split is by a hash of the file name).
    config.dataset = "synthetic"
    config.test_share = HELD_OUT_SHARE
    config.num_synthetic_faces = math.ceil(FLAGS.num_faces / (0.35 * HELD_OUT_SHARE) * 1.25)
    config.data_dir = str(workdir / "tfds")
    config.eval_num_faces = FLAGS.num_faces
    if not config.inception_weights:
        path = workdir / "random_inception.npz"
        workdir.mkdir(parents=True, exist_ok=True)
        random_inception_weights(path)
        config.inception_weights = str(path)
    config_validation.validate(config)
    runtime.enable_compilation_cache(workdir / "compilation_cache")

    from input_pipeline import dataset

    started = time.monotonic()
    builder = dataset.prepare_dataset(config)
    print(f"synthetic faces: {config.num_synthetic_faces} in {time.monotonic() - started:.0f} s")
    params = cyclegan.init_generator_params(config)
    for run in ("cold", "warm"):
        result = evaluate.evaluate(config, workdir / "run", params, 0, builder=builder)
        metrics = result.metrics
        n = metrics["young_to_old"]["all"]["faces"], metrics["old_to_young"]["all"]["faces"]
        print(
            f"{run}: {metrics['seconds']:.0f} s for {n[0]} young and {n[1]} old faces "
            f"at {config.image_size}px"
        )
        for stage, seconds in metrics["seconds_by_stage"].items():
            images = {
                "face models on the real faces (cached)": 2 * sum(n),
                "face models on the generated faces": sum(n),
                "generators (translations and cycles)": 2 * sum(n),
                "Inception on the real faces (cached)": 2 * sum(n),
                "Inception on the generated faces": sum(n),
            }.get(stage)
            rate = f", {images / seconds:.1f} images/s" if images and seconds > 1 else ""
            print(f"  {stage}: {seconds:.1f} s{rate}")
    print(f"report: {result.directory / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
