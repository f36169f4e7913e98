"""A deterministic stand-in for the tf.data pipeline, for tests of the training loop."""

import json

import numpy as np
from etils import epath


class RandomBatches:
    """Host-local slices of reproducible global batches {'young', 'old'}, with save/restore.

    Global batch k is drawn from a generator seeded with k, so every process (and a
    single process with all the devices) sees the same global batches.
    """

    def __init__(
        self, global_batch_size, image_size, process_index=0, process_count=1, nan_at_batch=None
    ):
        self.global_batch_size = global_batch_size
        self.image_size = image_size
        self.host_rows = slice(
            process_index * global_batch_size // process_count,
            (process_index + 1) * global_batch_size // process_count,
        )
        self.nan_at_batch = nan_at_batch
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng(self.position)
        shape = (self.global_batch_size, self.image_size, self.image_size, 3)
        batch = {
            domain: rng.uniform(-1, 1, shape).astype(np.float32)[self.host_rows]
            for domain in ("young", "old")
        }
        if self.position == self.nan_at_batch:
            batch["old"][0, 0, 0, 0] = np.nan
        self.position += 1
        return batch

    def save(self, directory):
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "position.json").write_text(json.dumps(self.position))

    def restore(self, directory):
        self.position = json.loads((epath.Path(directory) / "position.json").read_text())
