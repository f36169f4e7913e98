"""Both generators as one file that runs without the training code; and how tools load them.

    python -m faceage_jax.export --workdir DIR [--step N] -o generators.faceage

The file is a zip archive:

    manifest.json            format and version, image size, checkpoint step, the
                             run's config, the face template (alignment.py), and
                             for each generator its file names
    young_to_old.jax_export  `jax.export` serialization (StableHLO, lowered for
    old_to_young.jax_export  CPU, CUDA and TPU) of f(weights, images) -> images,
                             images float32 [batch, S, S, 3] in [-1, 1] with a
                             symbolic batch dimension
    young_to_old.npz         the weights, the function's first argument, as a
    old_to_young.npz         list of arrays (np.load with allow_pickle=False)

Loading it (`load`) needs jax and numpy only: not TensorFlow, Flax, Orbax or
this package's training modules. `Generators` is what the photo tool and the
page call, built from this file or from a training run's checkpoint
(`from_checkpoint`), with one behaviour either way.
"""

import functools
import io
import json
import os
import zipfile

import jax
import numpy as np

from faceage_jax import alignment

FORMAT = "faceage-jax-generators"
FORMAT_VERSION = 1
DIRECTIONS = ("young_to_old", "old_to_young")  # cyclegan.GENERATORS, without importing it.
PLATFORMS = ("cpu", "cuda", "tpu")
# Batches are padded to the next power of two up to this: at most 4 compiled shapes.
MAX_BATCH = 8
TEMPLATE_FILE = "face_template.json"
# Training faces per domain the face template is measured on (1-2 s per 100 faces).
TEMPLATE_FACES_PER_DOMAIN = 200


class ExportError(ValueError):
    """A file that is not an exported model of this format; the message says what to do."""


def _bucket(num: int, max_batch: int) -> int:
    size = 1
    while size < min(num, max_batch):
        size *= 2
    return size


class Generators:
    """Both generators behind one call: uint8 chips in, float32 outputs in [-1, 1] out.

    `functions[direction]`: a jitted f(images float32 [B, S, S, 3]) -> images.
    Calls are cut into batches of at most `max_batch`, each padded to a power of
    two, so a server compiles at most log2(max_batch) + 1 shapes per direction.
    """

    def __init__(self, functions, *, image_size, step, template, description, max_batch=MAX_BATCH):
        self._functions = functions
        self.image_size = int(image_size)
        self.step = int(step)
        self.template = template
        self.description = description
        self.max_batch = max_batch

    def __call__(self, chips: np.ndarray, direction: str) -> np.ndarray:
        """chips: uint8 [N, S, S, 3] -> float32 [N, S, S, 3] in [-1, 1]."""
        if direction not in self._functions:
            raise ValueError(f"direction is one of {DIRECTIONS}, not {direction!r}")
        size = self.image_size
        if chips.shape[1:] != (size, size, 3):
            raise ValueError(f"chips are [N, {size}, {size}, 3], not {list(chips.shape)}")
        outputs = []
        for start in range(0, len(chips), self.max_batch):
            batch = chips[start : start + self.max_batch].astype(np.float32) / 127.5 - 1
            padded = np.zeros((_bucket(len(batch), self.max_batch), size, size, 3), np.float32)
            padded[: len(batch)] = batch
            outputs.append(np.asarray(self._functions[direction](padded))[: len(batch)])
        if not outputs:
            return np.zeros((0, size, size, 3), np.float32)
        return np.concatenate(outputs)


def _describe(config, step: int) -> str:
    data = "synthetic faces" if config.dataset == "synthetic" else "UTKFace"
    return (
        f"Trained on {data}, ages {config.young_age_min}-{config.young_age_max} and "
        f"{config.old_age_min}-{config.old_age_max}, at {config.image_size}x{config.image_size}; "
        f"checkpoint step {step}."
    )


# ------------------------------------------------------------ from a training run


def training_template(config, workdir) -> alignment.FaceTemplate:
    """The face template of a run's training faces; measured once, kept in the workdir."""
    from etils import epath

    path = epath.Path(workdir) / TEMPLATE_FILE
    if path.exists():
        return alignment.FaceTemplate.from_json(path.read_text())
    from faceage_jax import evaluate, faces, train

    builder = train.prepare_data(config)
    chips = np.concatenate(
        [
            evaluate.load_faces(builder, config, domain, "train", TEMPLATE_FACES_PER_DOMAIN).images
            for domain in ("young", "old")
        ]
    )
    _, _, landmarks = faces.FaceFinder().locate(chips)
    template = alignment.measure_template(
        landmarks, config.image_size, f"{builder.info.full_name} train split"
    )
    temporary = path.parent / f"{TEMPLATE_FILE}.tmp-{os.getpid()}"
    temporary.write_text(template.to_json())
    temporary.replace(path)
    return template


def restore(workdir, step=None, config=None):
    """(config, generator params {direction: params}, step, template) of a training run."""
    from faceage_jax import checkpointing, config_validation, evaluate, train

    workdir = train.absolute_path(workdir)
    if config is None:
        config = checkpointing.load_config(workdir)
    config_validation.validate(config)
    params, step = evaluate.restore_generator_params(config, workdir, step)
    return config, params, step, training_template(config, workdir)


def from_checkpoint(workdir, step=None, config=None) -> Generators:
    """The generators of a training run's newest (or `step`) checkpoint, in this process."""
    from faceage_jax import cyclegan

    config, params, step, template = restore(workdir, step, config)
    apply = jax.jit(cyclegan.create_networks(config).generator.apply)
    functions = {name: functools.partial(apply, params[name]) for name in DIRECTIONS}
    return Generators(
        functions,
        image_size=config.image_size,
        step=step,
        template=template,
        description=_describe(config, step),
    )


# ------------------------------------------------------------ the file


def save(path, config, params, step: int, template: alignment.FaceTemplate) -> None:
    """Writes the exported file of both generators (see the module docstring)."""
    from faceage_jax import cyclegan

    generator = cyclegan.create_networks(config).generator
    size = config.image_size
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, size, size, 3), np.float32)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "image_size": size,
        "step": int(step),
        "description": _describe(config, step),
        "template": json.loads(template.to_json()),
        "config": json.loads(config.to_json_best_effort()),
        "jax_version": jax.__version__,
        "generators": {},
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in DIRECTIONS:
            leaves, treedef = jax.tree.flatten(params[name])

            def apply(weights, images, treedef=treedef):
                return generator.apply(jax.tree.unflatten(treedef, weights), images)

            weights = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
            exported = jax.export.export(jax.jit(apply), platforms=PLATFORMS)(weights, images)
            archive.writestr(f"{name}.jax_export", bytes(exported.serialize()))
            buffer = io.BytesIO()
            np.savez(buffer, *[np.asarray(x) for x in leaves])
            archive.writestr(f"{name}.npz", buffer.getvalue())
            manifest["generators"][name] = {
                "function": f"{name}.jax_export",
                "weights": f"{name}.npz",
                "num_weights": len(leaves),
            }
        archive.writestr("manifest.json", json.dumps(manifest, indent=2))


def load(path) -> Generators:
    """The generators of an exported file. Raises ExportError for anything else."""
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError) as error:
        raise ExportError(
            f"{path} is not an exported model ({error}); make one with "
            "python -m faceage_jax.export --workdir DIR -o PATH."
        ) from error
    with archive:
        try:
            manifest = json.loads(archive.read("manifest.json"))
        except (KeyError, ValueError) as error:
            raise ExportError(f"{path} has no readable manifest.json ({error}).") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ExportError(f"{path} is not an exported faceage-jax model.")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ExportError(
                f"{path} is format version {manifest.get('format_version')}; this version of "
                f"faceage-jax reads {FORMAT_VERSION}. Export the model again with it."
            )
        try:
            return _generators(path, archive, manifest)
        except ExportError:
            raise
        except Exception as error:  # A damaged or hand-edited file: say which, not a trace.
            raise ExportError(
                f"{path} is damaged ({type(error).__name__}: {error}); export the model again."
            ) from error


def _generators(path, archive: zipfile.ZipFile, manifest: dict) -> Generators:
    # The name jax.export gives this backend ('cuda' or 'rocm' where the backend is 'gpu').
    platform = jax.export.default_export_platform()
    functions = {}
    for name in DIRECTIONS:
        entry = manifest["generators"][name]
        exported = jax.export.deserialize(bytearray(archive.read(entry["function"])))
        if platform not in exported.platforms:
            raise ExportError(f"{path} was exported for {exported.platforms}, not for {platform}.")
        with np.load(io.BytesIO(archive.read(entry["weights"])), allow_pickle=False) as npz:
            weights = [jax.device_put(npz[f"arr_{i}"]) for i in range(entry["num_weights"])]
        functions[name] = functools.partial(jax.jit(exported.call), weights)
    return Generators(
        functions,
        image_size=manifest["image_size"],
        step=manifest["step"],
        template=alignment.FaceTemplate.from_json(json.dumps(manifest["template"])),
        description=manifest["description"],
    )


# ------------------------------------------------------------ command line


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "The training run's directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the newest.")
    flags.DEFINE_string("output", None, "The file to write.", short_name="o")
    config_flags.DEFINE_config_file(
        "config", None, "The run's config file; default: the workdir's config.json."
    )
    flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    try:
        config, params, step, template = restore(FLAGS.workdir, FLAGS.step, FLAGS.config)
    except FileNotFoundError as error:
        raise app.UsageError(str(error)) from None
    save(FLAGS.output, config, params, step, template)
    size = os.path.getsize(FLAGS.output) / 2**20
    print(f"Exported step {step} of {FLAGS.workdir} to {FLAGS.output} ({size:.1f} MiB).")


def run():
    """The console script `faceage-export` and `python -m faceage_jax.export`."""
    from faceage_jax import runtime

    runtime.run_app(main, _define_flags)


if __name__ == "__main__":
    run()
