"""The training job: data, resume, the loop, logs, samples, checkpoints.

`train_and_evaluate` is what `python -m faceage_jax.main` runs.
"""

import functools
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from faceage_jax import checkpointing, config_validation, cyclegan, parallel, runtime, samples
from input_pipeline import dataset, pipeline


def prepare_data(config: ml_collections.ConfigDict):
    """The dataset's builder, built on first use: by process 0, which the others wait for."""
    if jax.process_index() == 0:
        builder = dataset.prepare_dataset(config)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("faceage_jax.prepare_data")
    if jax.process_index() != 0:
        builder = dataset.prepare_dataset(config)  # Built by now: only opens it.
    return builder


def absolute_path(path: str) -> epath.Path:
    """`path` made absolute if local (Orbax refuses relative paths); URLs (gs://) as given."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def run_schedule(config, workdir, steps_per_epoch: int, resuming: bool) -> cyclegan.Schedule:
    """The learning-rate schedule: the config's, or on a resume the one the run started with."""
    schedule = cyclegan.create_schedule(config, steps_per_epoch)
    recorded = checkpointing.load_schedule(workdir) if resuming else None
    if recorded is None:
        if jax.process_index() == 0:
            checkpointing.save_schedule(workdir, *schedule)
        logging.info("Learning rate: %s.", schedule.describe(config.learning_rate))
        return schedule
    recorded = cyclegan.Schedule(*recorded)
    logging.info(
        "Learning rate: %s (as this run started).", recorded.describe(config.learning_rate)
    )
    if recorded != schedule:
        logging.warning(
            "The config now gives the schedule %s; the run keeps the one it started with. "
            "Start a new workdir to train with the new one.",
            schedule.describe(config.learning_rate),
        )
    return recorded


def warn_if_bfloat16_on_cpu(config, cpu: runtime.CpuInfo | None = None) -> None:
    """Warns when `compute_dtype='bfloat16'` on this CPU is not known to beat float32.

    With AMX, oneDNN's bfloat16 kernels (`cyclegan.compiler_options`) made the
    step faster than in float32 on an Intel Xeon (README, "Benchmarks");
    AVX-512 BF16 alone is not measured with them. Without either, bfloat16
    arithmetic goes through float32 and conversions, and cannot beat float32.
    """
    if config.compute_dtype != "bfloat16" or jax.default_backend() != "cpu":
        return
    cpu = cpu or runtime.cpu_info()
    if "amx_bf16" not in cpu.flags:
        logging.warning(
            "compute_dtype='bfloat16' on a CPU without AMX (%s): bfloat16 was measured faster "
            "than float32 only with AMX; without AVX-512 BF16 either, bfloat16 arithmetic goes "
            "through float32 and conversions, and the step is slower than in float32 (README, "
            "'Benchmarks'). Drop --config.compute_dtype to train in float32.",
            cpu.model,
        )


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the run stops without saving the bad state."""


def check_finite(pending: list[tuple[int, dict[str, jax.Array]]]) -> None:
    """Raises NonFiniteLossError naming the first step and loss that are not finite."""
    for step, metrics in pending:
        if float(metrics["nonfinite_loss"]):
            values = jax.device_get(metrics)
            bad = sorted(name for name, value in values.items() if not np.isfinite(value))
            raise NonFiniteLossError(
                f"Step {step}: loss {', '.join(bad)} is not finite "
                f"({ {name: float(values[name]) for name in bad} }). Stopping; the last "
                "checkpoint before it is kept. Try a lower --config.learning_rate, or "
                "float32 if you train in bfloat16."
            )


def mean_metrics(pending: list[tuple[int, dict[str, jax.Array]]]) -> dict[str, float]:
    values = jax.device_get([metrics for _, metrics in pending])
    return {
        name: float(np.mean([v[name] for v in values]))
        for name in values[0]
        if name != "nonfinite_loss"
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, train_iterator=None
) -> cyclegan.TrainState:
    """Trains (resuming from `workdir/checkpoints` if any) and returns the final state.

    `train_iterator` replaces the tf.data pipeline: an iterator of host-local
    batches {'young', 'old'} with `save(dir)`/`restore(dir)`, for custom data.
    Writes TensorBoard summaries and sample grids into `workdir` (process 0 only).
    """
    config_validation.validate(
        config, num_devices=jax.device_count(), num_processes=jax.process_count()
    )
    workdir = absolute_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    builder = prepare_data(config)
    steps_per_epoch = dataset.steps_per_epoch(builder, config)
    manager = checkpointing.create_checkpoint_manager(workdir, config)
    schedule = run_schedule(
        config, workdir, steps_per_epoch, resuming=manager.latest_step() is not None
    )
    num_train_steps = config.num_train_steps if config.num_train_steps > 0 else schedule.total_steps
    if num_train_steps > schedule.total_steps:
        logging.warning(
            "Steps %d to %d train at learning rate 0: the schedule ends at step %d.",
            schedule.total_steps + 1,
            num_train_steps,
            schedule.total_steps,
        )
    warn_if_bfloat16_on_cpu(config)
    mesh = parallel.create_mesh()
    functions = cyclegan.create_step_functions(config, mesh, schedule)
    if train_iterator is None:
        train_iterator = pipeline.create_train_iterator(builder, config)
    state, restored_step = checkpointing.restore_or_initialize(
        manager,
        functions.abstract_state,
        lambda: functions.init(jax.random.key(config.seed)),
        train_iterator,
    )
    checkpointing.install_preemption_handler()
    runtime.release_freed_memory()

    is_writer = jax.process_index() == 0
    if is_writer:
        checkpointing.save_config(workdir, config)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_writer)
    if restored_step is None:
        writer.write_hparams(dict(config.items()))
        for name, params in {**state.generator_params, **state.discriminator_params}.items():
            logging.info("%s:\n%s", name, parameter_overview.get_parameter_overview(params))
    logging.info(
        "Training %d steps (%d per epoch), global batch %d on %d devices of %d processes.",
        num_train_steps,
        steps_per_epoch,
        config.batch_size,
        jax.device_count(),
        jax.process_count(),
    )
    evaluator = None
    if config.eval_every_steps and jax.process_index() == 0:
        from faceage_jax import evaluate, faces

        models = faces.FaceModels()  # Fails now, not after hours, if a model is missing.
        evaluator = functools.partial(
            evaluate.evaluate, config, workdir, builder=builder, models=models
        )
    sample_faces = pipeline.load_sample_faces(builder, config)
    sampler = samples.create_sampler(config)
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=num_train_steps,
        writer=writer,
        every_steps=config.log_every_steps,
        every_secs=None,
    )

    step = first_step = int(jax.device_get(state.step))
    pending = []  # (step, metrics) not yet checked and logged.
    last_log_time = time.monotonic()
    try:
        while step < num_train_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = parallel.global_batch(mesh, next(train_iterator))
                state, metrics = functions.step(state, batch)
            if step == first_step:  # It compiled: return the compiler's memory.
                jax.block_until_ready(metrics)
                runtime.release_freed_memory()
            step += 1
            pending.append((step, metrics))

            preempted = checkpointing.preemption_requested(manager, step)
            must_save = preempted or step == num_train_steps or manager.should_save(step)
            if must_save or step % config.log_every_steps == 0:
                check_finite(pending)  # Before any save: a bad state is never checkpointed.
                summary = mean_metrics(pending)
                now = time.monotonic()
                summary["images_per_second"] = (
                    len(pending) * config.batch_size / (now - last_log_time)
                )
                writer.write_scalars(step, summary)
                pending, last_log_time = [], now
            # Every step, after the log's sync: its steps/s and ETA measure finished steps.
            report_progress(step)
            if must_save:
                checkpointing.save(manager, step, state, train_iterator)
            if step % config.sample_every_steps == 0 or step == num_train_steps:
                write_samples(writer, workdir, step, sampler(state.generator_params, sample_faces))
            if evaluator is not None and (
                step % config.eval_every_steps == 0 or step == num_train_steps
            ):
                # Process 0 only, after the save: the other processes wait at the next step.
                result = evaluator(state.generator_params, step)
                writer.write_scalars(step, result.scalars())
                for line in result.headline:
                    logging.info("%s", line)
                logging.info("Report: %s", result.directory / "report.md")
            if preempted:
                logging.warning("Stopped at step %d after a preemption request.", step)
                break
    finally:
        # Also when the run dies: saves under way complete, so the last good checkpoint stays.
        checkpointing.close(manager)
        writer.flush()
    return state


def write_samples(writer, workdir: epath.Path, step: int, rows) -> None:
    grid = samples.to_grid(jax.device_get(rows))
    if jax.process_index() == 0:
        writer.write_images(step, {"samples": grid[None]})
        path = samples.write_png(workdir / "samples", step, grid)
        logging.info("Wrote sample grid %s", path)
