"""Throughput of the training pipeline (decode, jitter, batch) on this machine.

Run (synthetic faces, generated into a temporary folder unless config.data_dir is set):
  python -m input_pipeline.bench --config configs/default.py
  python -m input_pipeline.bench --config configs/demo.py --config.data_dir=

Prints training images per second, counting the young and the old image of each
pair. The pipeline must stay well ahead of the training step that consumes it.
"""

import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from input_pipeline import dataset, pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True
)
_NUM_FACES = flags.DEFINE_integer(
    "num_faces", 4000, "Synthetic faces to generate (at least config.num_synthetic_faces)."
)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 500, "Batches to time, after a warm-up.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 20, "Batches read before timing.")


def images_per_second(builder, config, num_batches: int, warmup_batches: int) -> float:
    """Training images (both domains) per second read from a fresh single-process pipeline."""
    iterator = pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)
    for _ in range(warmup_batches):
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    return num_batches * config.batch_size * len(dataset.DOMAINS) / elapsed


def main(argv):
    del argv
    config = _CONFIG.value
    config.dataset = "synthetic"
    config.num_synthetic_faces = max(config.num_synthetic_faces, _NUM_FACES.value)
    with tempfile.TemporaryDirectory(prefix="faceage_bench_") as temporary_dir:
        config.data_dir = config.data_dir or temporary_dir
        builder = dataset.prepare_dataset(config)
        rate = images_per_second(builder, config, _NUM_BATCHES.value, _WARMUP_BATCHES.value)
    print(
        f"{rate:.0f} images/s at {config.image_size}px (load_size {config.load_size}, "
        f"global batch {config.batch_size}, {config.num_synthetic_faces} synthetic faces)"
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
