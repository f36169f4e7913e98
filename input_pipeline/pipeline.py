"""tf.data pipelines over the `utk_face` dataset: training batches and held-out faces.

Training reads this process's share of the train split once (see `dataset`),
keeps each age domain's faces as JPEG bytes in memory, and draws them in a
fresh random permutation per epoch of the domain, computed for each draw from
(seed, position) (`draw_order`); then decodes, jitters and batches. Each domain
draws forever and the two are zipped, so training never runs out of either.
The data position is the number of faces drawn per domain: a checkpoint stores
that one number, and a resumed run draws exactly the batches the
uninterrupted one would.
"""

import functools
import json

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from input_pipeline import dataset
from input_pipeline.dataset import DOMAINS, age_ranges

POSITION_FILE = "position.json"  # The data position in a checkpoint, per process.


def _process_defaults(process_index, process_count) -> tuple[int, int]:
    """jax's process index and count where the caller gives none."""
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"The global batch size {global_batch_size} must divide evenly over "
            f"{process_count} processes."
        )
    return global_batch_size // process_count


def _to_unit_range(image: tf.Tensor) -> tf.Tensor:
    """[0, 255] pixels to float32 in [-1, 1]."""
    return tf.clip_by_value(tf.cast(image, tf.float32) / 127.5 - 1.0, -1.0, 1.0)


def jitter(image: tf.Tensor, seed: tf.Tensor, config) -> tf.Tensor:
    """The reference's training jitter: resize to load_size, random crop, random flip.

    Args:
      image: [H, W, 3] uint8.
      seed: [2] int64, a stateless seed: the same seed gives the same crop and flip.
      config: gives load_size and image_size.

    Returns:
      [image_size, image_size, 3] float32 in [0, 255].
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.resize(image, [config.load_size] * 2, antialias=True)
    image = tf.image.stateless_random_crop(image, [config.image_size] * 2 + [3], seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _eval_image(image_size: int, record: dict) -> dict:
    image = tf.io.decode_jpeg(record["image"], channels=3)
    image = tf.image.resize(image, [image_size] * 2, antialias=True)
    labels = {key: record[key] for key in ("age", "gender", "race", "file_name")}
    return {"image": _to_unit_range(image), **labels}


def _with_options(data: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning thread: deleting an iterator waits for that thread's current
    # sleep, whose period grows with the iterator's age (TF 2.21): at the end of a
    # long run, a process that outlives its preemption notice. Without it, AUTOTUNE
    # parallelism is min(16, schedulable cores) and prefetch buffers still grow on
    # their own; the training pipeline measured as fast either way (README).
    options.autotune.enabled = False
    return data.with_options(options)


def train_split(process_index: int, process_count: int) -> str:
    """This process's equal, disjoint share of the train split (the remainder is dropped)."""
    return tfds.split_for_jax_process(
        "train", process_index=process_index, process_count=process_count, drop_remainder=True
    )


def load_train_faces(
    builder: tfds.core.DatasetBuilder, config, *, process_index=None, process_count=None
) -> dict[str, np.ndarray]:
    """This process's training faces of each domain, still JPEG bytes, in stored order.

    {'young': [N_young] bytes, 'old': [N_old] bytes}: small enough for all of
    UTKFace, read once, so that any face can be drawn by its index.
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    split = train_split(process_index, process_count)
    records = dataset.read_faces(builder, split)
    images, ages = [], []
    for batch in records.map(lambda r: (r["image"], r["age"])).batch(4096).as_numpy_iterator():
        images.append(batch[0])
        ages.append(batch[1])
    images = np.concatenate(images) if images else np.zeros([0], object)
    ages = np.concatenate(ages) if ages else np.zeros([0], np.int32)
    faces = {
        domain: images[(ages >= low) & (ages <= high)]
        for domain, (low, high) in age_ranges(config).items()
    }
    counts = {domain: len(faces[domain]) for domain in DOMAINS} | {"all": len(images)}
    dataset.check_domains(
        counts, config, f"the train split of process {process_index}/{process_count}"
    )
    return faces


def draw_order(position: tf.Tensor, num_faces: int, seed: tf.Tensor) -> tf.Tensor:
    """Index of the face a domain shows at `position` (its count of faces drawn so far).

    Every epoch of the domain (`num_faces` draws) is its own random permutation of
    the faces, a pure function of (seed, epoch): any position is computed directly,
    which is what makes the data position a single number.
    """
    epoch_seed = tf.random.experimental.stateless_fold_in(seed, position // num_faces)
    return tf.random.experimental.index_shuffle(position % num_faces, epoch_seed, num_faces - 1)


def _domain_batches(
    jpegs: np.ndarray, domain_index: int, host_batch_size: int, images_read: int, config
) -> tf.data.Dataset:
    """Endless batches of one domain, starting at its `images_read`-th draw."""
    jpegs = tf.constant(jpegs, tf.string)
    num_faces = int(jpegs.shape[0])
    order_seed = tf.constant([config.seed, domain_index], tf.int64)
    jitter_seed = tf.constant([config.seed, len(DOMAINS) + domain_index], tf.int64)

    def image_at(position):
        jpeg = tf.gather(jpegs, draw_order(position, num_faces, order_seed))
        image = tf.io.decode_jpeg(jpeg, channels=3)
        view_seed = tf.random.experimental.stateless_fold_in(jitter_seed, position)
        return _to_unit_range(jitter(image, view_seed, config))

    positions = tf.data.Dataset.range(images_read, np.iinfo(np.int64).max)
    images = positions.map(image_at, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return images.batch(host_batch_size, drop_remainder=True)


def train_dataset(
    faces: dict[str, np.ndarray], host_batch_size: int, images_read: int, config
) -> tf.data.Dataset:
    """Endless host-local batches {'young': [B, H, W, 3], 'old': [B, H, W, 3]} in [-1, 1].

    Each domain starts at its `images_read`-th draw; batch k of a run that started
    at 0 equals batch k - images_read / B of one started at `images_read`.
    """
    domains = {
        domain: _domain_batches(faces[domain], index, host_batch_size, images_read, config)
        for index, domain in enumerate(DOMAINS)
    }
    return _with_options(tf.data.Dataset.zip(domains).prefetch(tf.data.AUTOTUNE))


class DataPositionError(ValueError):
    """A saved data position that cannot be used: missing, malformed or not readable."""


class TrainIterator:
    """Host-local numpy batches whose position is one number: the faces drawn per domain.

    What a batch holds is a pure function of (seed, position), so saving writes a
    small JSON file and restoring rebuilds the pipeline at the saved position.
    Restoring also reads the first batch, so a position that cannot yield one
    fails at restore time, not a step later.
    """

    def __init__(self, faces: dict[str, np.ndarray], host_batch_size: int, config):
        self._faces = faces
        self._host_batch_size = host_batch_size
        self._config = config
        self._images_read = 0
        self._iterator = None  # Built on first use, at the current position.
        self._next_batch = None  # Read ahead by `restore`.

    @property
    def images_read(self) -> int:
        """Faces of each domain handed out so far."""
        return self._images_read

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._read() if self._next_batch is None else self._next_batch
        self._next_batch = None
        self._images_read += self._host_batch_size
        return batch

    def _read(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            batches = train_dataset(
                self._faces, self._host_batch_size, self._images_read, self._config
            )
            self._iterator = iter(batches)
        return {domain: images.numpy() for domain, images in next(self._iterator).items()}

    def _description(self) -> dict:
        return {
            "seed": self._config.seed,
            "faces": {domain: len(jpegs) for domain, jpegs in self._faces.items()},
        }

    def save(self, directory: epath.PathLike) -> None:
        """Writes the position into `directory`/position.json (the directory is created)."""
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        position = {"images_read": self._images_read, **self._description()}
        (directory / POSITION_FILE).write_text(json.dumps(position))

    def restore(self, directory: epath.PathLike) -> None:
        """Moves to the position saved in `directory` and reads its first batch.

        Raises DataPositionError if the file is missing or malformed.
        """
        path = epath.Path(directory) / POSITION_FILE
        if not path.exists():
            raise DataPositionError(
                f"No data position in {directory}: expected {POSITION_FILE}, written by "
                "TrainIterator.save. (Older checkpoints held a tf.data iterator state, "
                "data_iterator.index, which is no longer read.)"
            )
        try:
            position = json.loads(path.read_text())
            images_read = position["images_read"]
        except (ValueError, KeyError, TypeError) as error:
            raise DataPositionError(f"Malformed data position {path}: {error}") from error
        if not isinstance(images_read, int) or isinstance(images_read, bool) or images_read < 0:
            raise DataPositionError(
                f"Malformed data position {path}: images_read={images_read!r}, expected a "
                "non-negative integer."
            )
        if {key: position.get(key) for key in ("seed", "faces")} != self._description():
            logging.warning(
                "The data position in %s was saved for %s; this run has %s. Training goes on "
                "from face %d of each domain, but not with the batches the saved run would "
                "have drawn.",
                path,
                {key: position.get(key) for key in ("seed", "faces")},
                self._description(),
                images_read,
            )
        self._images_read = images_read
        self._iterator = None
        self._next_batch = self._read()


def create_train_iterator(
    builder: tfds.core.DatasetBuilder, config, *, process_index=None, process_count=None
) -> TrainIterator:
    """The training batches of this process; defaults to jax's process index and count."""
    process_index, process_count = _process_defaults(process_index, process_count)
    host_batch_size = _host_batch_size(config.batch_size, process_count)
    faces = load_train_faces(
        builder, config, process_index=process_index, process_count=process_count
    )
    return TrainIterator(faces, host_batch_size, config)


def create_eval_dataset(
    builder: tfds.core.DatasetBuilder,
    config,
    domain: str,
    *,
    batch_size: int | None = None,
    process_index=None,
    process_count=None,
    drop_remainder: bool = False,
    split: str = "test",
) -> tf.data.Dataset:
    """Faces of one domain of `split` (held out by default), in stored order, resized to
    image_size, no jitter.

    Yields {'image': [B, H, W, 3] float32 in [-1, 1], 'age', 'gender', 'race': [B],
    'file_name': [B]}; B is the global `batch_size` (default config.batch_size) over the
    process count.
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    host_batch_size = _host_batch_size(batch_size or config.batch_size, process_count)
    split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count
    )
    records = dataset.select_ages(dataset.read_faces(builder, split), age_ranges(config)[domain])
    images = records.map(
        functools.partial(_eval_image, config.image_size), num_parallel_calls=tf.data.AUTOTUNE
    )
    batches = images.batch(host_batch_size, drop_remainder=drop_remainder)
    return _with_options(batches.prefetch(tf.data.AUTOTUNE))


def load_sample_faces(
    builder: tfds.core.DatasetBuilder, config, num_faces: int | None = None
) -> dict[str, np.ndarray]:
    """The first `num_faces` held-out faces of each domain: {'young': [N, H, W, 3], 'old': ...}.

    The same faces on every process and in every run, for sample grids. Fewer than
    N when the test split holds fewer (a warning says so); an error when none.
    """
    num_faces = num_faces or config.num_sample_faces
    faces = {}
    for domain in DOMAINS:
        held_out = create_eval_dataset(
            builder, config, domain, batch_size=num_faces, process_index=0, process_count=1
        )
        batch = next(iter(held_out.take(1)), None)
        if batch is None:
            counts = dataset.count_domain_faces(builder, "test", config)
            dataset.check_domains(counts, config, "the test split")
        faces[domain] = batch["image"].numpy()
        if len(faces[domain]) < num_faces:
            logging.warning(
                "Only %d held-out %s faces, fewer than the %d asked for.",
                len(faces[domain]),
                domain,
                num_faces,
            )
    return faces
