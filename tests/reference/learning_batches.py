"""The exact training batches and held-out faces of a run, for the PyTorch reference.

Run by hand in the project's venv (issue: training quality, learning equivalence):

    .venv/bin/python tests/reference/learning_batches.py --config configs/demo.py \
        --seed 0 --out /tmp/learning/batches_0.npz

Writes `young`, `old`: float32 [steps, B, S, S, 3] in [-1, 1], the batches
`faceage_jax.train` draws for that seed, in order (the pipeline's batches are a
pure function of the seed and the position); `test_young`, `test_old`: the
held-out faces at the config's size, as `evaluate` reads them. Both trainings
then see the same images; only their initial weights and their pools' draws
differ, as they would between two seeds.
"""

import argparse

import numpy as np

from faceage_jax import age_photo, cyclegan, evaluate, train
from input_pipeline import dataset, pipeline


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = age_photo.load_config_file(args.config)
    config.seed = args.seed
    builder = train.prepare_data(config)
    steps = cyclegan.create_schedule(config, dataset.steps_per_epoch(builder, config)).total_steps
    iterator = pipeline.create_train_iterator(builder, config)
    batches = [next(iterator) for _ in range(steps)]
    test = {
        domain: evaluate.load_faces(builder, config, domain, "test", -1).images
        for domain in ("young", "old")
    }
    np.savez(
        args.out,
        young=np.stack([b["young"] for b in batches]).astype(np.float32),
        old=np.stack([b["old"] for b in batches]).astype(np.float32),
        test_young=test["young"],
        test_old=test["old"],
        steps_per_epoch=dataset.steps_per_epoch(builder, config),
    )
    print(f"{steps} batches and {len(test['young'])}+{len(test['old'])} test faces: {args.out}")


if __name__ == "__main__":
    main()
