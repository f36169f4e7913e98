"""Does faceage_jax's training learn like the reference recipe? Run by hand, in the project's venv.

    # 1. The batches and held-out faces of each seed (learning_batches.py), then each
    #    seed trained by faceage_jax and by the PyTorch reference (torch_cyclegan.py):
    .venv/bin/python tests/reference/learning_comparison.py train --seed 0 \
        --batches /tmp/learning/batches_0.npz --out /tmp/learning/jax_0.npz \
        [--residual_convs direct]
    # 2. Curves (a PNG) and the end figures, per seed and over seeds:
    .venv/bin/python tests/reference/learning_comparison.py compare /tmp/learning \
        --runs jax torch [jax_direct]

`train` runs `faceage_jax.train` on the demo config with that seed (so its
pipeline draws the very batches that were dumped for the reference), logging
every step, then writes the loss terms per step and the generators' outputs on
the held-out faces in torch_cyclegan.py's format. `compare` reads
`<run>_<seed>.npz` for every run and seed, plots each loss term (20-step
means; a band per run from its lowest to its highest seed), and prints the end
figures: the synthetic faces' hair greyness of the aged and rejuvenated faces,
CIEDE2000 on the border, and the cycle's L1 error in [-1, 1].
"""

import argparse
import pathlib
import re
import tempfile

import numpy as np

TERMS = (
    "generator/adversarial_young_to_old",
    "generator/adversarial_old_to_young",
    "generator/cycle_young",
    "generator/cycle_old",
    "generator/identity_old",
    "generator/identity_young",
    "discriminator/young",
    "discriminator/old",
)
WINDOW = 20


def train(args):
    from faceage_jax import age_photo, export, faces
    from faceage_jax import train as training
    from tests import helpers

    config = age_photo.load_config_file(args.config)
    config.seed = args.seed
    config.log_every_steps = 1
    config.sample_every_steps = 10_000
    config.residual_convs = args.residual_convs
    data = np.load(args.batches)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="learning_"))
    training.train_and_evaluate(config, str(workdir))
    scalars = helpers.logged_scalars(workdir, ("generator/", "discriminator/"))
    steps = sorted(scalars)
    assert steps == list(range(1, len(data["young"]) + 1)), (steps[:3], steps[-3:])
    log = {f"loss/{name}": np.array([scalars[s][name] for s in steps]) for name in TERMS}
    generators = export.from_checkpoint(workdir)
    outputs = {}
    for name, back, images in (
        ("young_to_old", "old_to_young", data["test_young"]),
        ("old_to_young", "young_to_old", data["test_old"]),
    ):
        generated = generators(images, name)
        outputs[f"{name}/generated"] = generated
        outputs[f"{name}/cycle"] = generators(faces.to_uint8(generated), back)
    np.savez(args.out, **log, **outputs)
    print(f"wrote {args.out}")


def end_figures(run: dict, data: dict) -> dict:
    from skimage import color

    from faceage_jax import evaluate, faces

    figures = {}
    for name, key in (("young_to_old", "test_young"), ("old_to_young", "test_old")):
        inputs = data[key]
        generated = faces.to_uint8(run[f"{name}/generated"])
        figures[f"{name} hair greyness"] = evaluate.hair_greyness(generated).mean()
        border = evaluate.border_mask(inputs.shape[1])
        delta = [
            color.deltaE_ciede2000(color.rgb2lab(a), color.rgb2lab(b))[border].mean()
            for a, b in zip(inputs, generated, strict=True)
        ]
        figures[f"{name} border dE"] = float(np.mean(delta))
        cycle = run[f"{name}/cycle"]
        figures[f"{name} cycle L1"] = float(
            np.abs(cycle - (inputs.astype(np.float32) / 127.5 - 1)).mean()
        )
    return figures


def windowed(values: np.ndarray) -> np.ndarray:
    usable = len(values) // WINDOW * WINDOW
    return values[:usable].reshape(-1, WINDOW).mean(axis=1)


def compare(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from faceage_jax import evaluate

    folder = pathlib.Path(args.folder)
    seeds = sorted(
        {
            int(m.group(1))
            for p in folder.glob("batches_*.npz")
            if (m := re.search(r"_(\d+)", p.name))
        }
    )
    runs = {
        name: {s: dict(np.load(folder / f"{name}_{s}.npz")) for s in seeds} for name in args.runs
    }
    data = {s: dict(np.load(folder / f"batches_{s}.npz")) for s in seeds}
    real = {
        s: {
            "young hair greyness": evaluate.hair_greyness(data[s]["test_young"]).mean(),
            "old hair greyness": evaluate.hair_greyness(data[s]["test_old"]).mean(),
        }
        for s in seeds
    }
    figure, axes = plt.subplots(2, 4, figsize=(18, 8), sharex=True)
    colours = dict(zip(args.runs, ["tab:blue", "tab:orange", "tab:green", "tab:red"], strict=False))
    for axis, term in zip(axes.flat, TERMS, strict=True):
        for name in args.runs:
            curves = np.stack([windowed(runs[name][s][f"loss/{term}"]) for s in seeds])
            x = (np.arange(curves.shape[1]) + 1) * WINDOW
            axis.plot(x, curves.mean(0), color=colours[name], label=name)
            axis.fill_between(x, curves.min(0), curves.max(0), color=colours[name], alpha=0.25)
        axis.set_title(term, fontsize=10)
        axis.set_xlabel("step")
    axes.flat[0].legend()
    figure.suptitle(f"Loss terms, {WINDOW}-step means; bands: lowest to highest of seeds {seeds}")
    figure.tight_layout()
    figure.savefig(folder / "learning_curves.png", dpi=80)
    print(f"curves: {folder / 'learning_curves.png'}")

    print(
        f"seeds {seeds}; real held-out faces' hair greyness: young "
        f"{np.mean([real[s]['young hair greyness'] for s in seeds]):.3f}, old "
        f"{np.mean([real[s]['old hair greyness'] for s in seeds]):.3f}"
    )
    print("| run | figure | per seed | mean |")
    print("| --- | --- | --- | --- |")
    for name in args.runs:
        per_seed = [end_figures(runs[name][s], data[s]) for s in seeds]
        for key in per_seed[0]:
            values = [f[key] for f in per_seed]
            print(
                f"| {name} | {key} | {', '.join(f'{v:.3f}' for v in values)} | "
                f"{np.mean(values):.3f} |"
            )
    print("| run | loss term, mean of the last 100 steps | per seed | mean |")
    print("| --- | --- | --- | --- |")
    for term in TERMS:
        for name in args.runs:
            values = [runs[name][s][f"loss/{term}"][-100:].mean() for s in seeds]
            print(
                f"| {name} | {term} | {', '.join(f'{v:.3f}' for v in values)} | "
                f"{np.mean(values):.3f} |"
            )


def main():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train")
    run.add_argument("--seed", type=int, required=True)
    run.add_argument("--batches", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--residual_convs", default="auto")
    run.add_argument("--config", default="configs/demo.py")
    comparison = commands.add_parser("compare")
    comparison.add_argument("folder")
    comparison.add_argument("--runs", nargs="+", default=["jax", "torch"])
    args = parser.parse_args()
    train(args) if args.command == "train" else compare(args)


if __name__ == "__main__":
    main()
