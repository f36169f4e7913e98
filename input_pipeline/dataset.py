"""The `utk_face` dataset of a config: built once, then read by split and age domain.

Both kinds of data go through the `utk_face` TFDS builder (`utkface`): real
UTKFace is built from `config.manual_dir`, synthetic faces are generated into
a folder first. `prepare_dataset` returns the builder; a run calls it once and
passes the builder to everything that reads faces.
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from input_pipeline import synthetic, utkface

DOMAINS = ("young", "old")
SYNTHETIC_FACES_SEED = 0  # Synthetic faces do not change with the training seed.


def age_ranges(config) -> dict[str, tuple[int, int]]:
    """Inclusive age range of each domain."""
    return {
        "young": (config.young_age_min, config.young_age_max),
        "old": (config.old_age_min, config.old_age_max),
    }


def _default_data_dir() -> epath.Path:
    return epath.Path(tfds.core.constants.get_default_data_dir())


def prepare_dataset(config) -> tfds.core.DatasetBuilder:
    """The `utk_face` builder for `config`, built on first use (real or synthetic faces).

    Call it once per run and pass the builder on: the functions below read from it.
    """
    builder_config = utkface.config_for_test_share(config.test_share)
    if config.dataset == "synthetic":
        root = epath.Path(config.data_dir or _default_data_dir())
        root = root / f"synthetic_faces_v{synthetic.VERSION}_{config.num_synthetic_faces}"
        builder = tfds.builder("utk_face", data_dir=root, config=builder_config)
        if not builder.is_prepared():
            logging.info("Writing %d synthetic faces to %s", config.num_synthetic_faces, root)
            faces_dir = root / "manual" / utkface.FOLDER_NAME
            synthetic.write_faces(faces_dir, config.num_synthetic_faces, SYNTHETIC_FACES_SEED)
            _build(builder, faces_dir.parent)
    else:
        builder = tfds.builder("utk_face", data_dir=config.data_dir or None, config=builder_config)
        if not builder.is_prepared():
            manual_dir = _manual_dir(config.manual_dir, builder.data_dir)
            _build(builder, manual_dir)
    return builder


def _manual_dir(manual_dir: str, data_dir: epath.Path) -> epath.Path:
    """The folder holding UTKFace.tar.gz or the faces, from `config.manual_dir`."""
    how = (
        f"Download {utkface.ARCHIVE_NAME} ('Aligned&Cropped Faces') from {utkface.HOMEPAGE} "
        f"and pass --config.manual_dir=/path/to/{utkface.ARCHIVE_NAME} (or its extracted folder)."
    )
    if not manual_dir:
        raise ValueError(
            f"UTKFace is not built in {data_dir} and config.manual_dir is empty. {how}"
        )
    path = epath.Path(manual_dir)
    if not path.exists():
        raise FileNotFoundError(f"config.manual_dir {path} does not exist. {how}")
    if path.is_dir():
        return path
    if path.name != utkface.ARCHIVE_NAME:
        raise ValueError(
            f"config.manual_dir {path} is a file but not {utkface.ARCHIVE_NAME}: rename it, "
            f"or pass the folder of extracted faces. {how}"
        )
    return path.parent


def _build(builder: tfds.core.DatasetBuilder, manual_dir: epath.Path) -> None:
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=download_config)


def read_faces(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """Records of `split` in stored order, the image still JPEG bytes."""
    return builder.as_dataset(
        split=split,
        decoders={"image": tfds.decode.SkipDecoding()},
        shuffle_files=False,
        # Read once per run (training) or streamed (evaluation): nothing to cache.
        read_config=tfds.ReadConfig(try_autocache=False),
    )


def select_ages(records: tf.data.Dataset, age_range: tuple[int, int]) -> tf.data.Dataset:
    """Records whose age lies in the inclusive `age_range`."""
    low, high = age_range
    return records.filter(lambda record: (record["age"] >= low) & (record["age"] <= high))


def count_domain_faces(builder: tfds.core.DatasetBuilder, split: str, config) -> dict[str, int]:
    """Faces of each domain in `split`, and `all` faces; reads the ages only."""
    ages_only = read_faces(builder, split).map(lambda record: record["age"])
    batches = list(ages_only.batch(4096).as_numpy_iterator())
    ages = np.concatenate(batches) if batches else np.zeros([0], np.int32)
    counts = {
        domain: int(np.count_nonzero((ages >= low) & (ages <= high)))
        for domain, (low, high) in age_ranges(config).items()
    }
    return counts | {"all": len(ages)}


def check_domains(counts: dict[str, int], config, where: str) -> None:
    empty = [domain for domain in DOMAINS if counts[domain] == 0]
    if empty:
        ranges = ", ".join(f"{d} {low}-{high}" for d, (low, high) in age_ranges(config).items())
        found = ", ".join(f"{domain} {counts[domain]}" for domain in DOMAINS)
        raise ValueError(
            f"The {' and '.join(empty)} domain is empty in {where} (ages {ranges}): found "
            f"{found} among {counts['all']} faces. Widen config.young_age_min/max or "
            "config.old_age_min/max, or use more faces."
        )


def steps_per_epoch(builder: tfds.core.DatasetBuilder, config) -> int:
    """Steps that show every face of the larger domain once: its size / global batch."""
    counts = count_domain_faces(builder, "train", config)
    check_domains(counts, config, "the train split")
    return max(1, max(counts[domain] for domain in DOMAINS) // config.batch_size)
