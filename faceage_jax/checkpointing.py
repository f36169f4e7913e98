"""Orbax checkpoints of the train state and the data iterator, for an exact resume.

One `CheckpointManager` writes, asynchronously, one checkpoint per saved step
under `workdir/checkpoints/` (a local or gs:// path). Each checkpoint is an
`ocp.args.Composite` of two items that other tools read by name: `state`, the
train state pytree (sharded or replicated `jax.Array`s, typed PRNG keys
included), and `data`, the position of every process's data iterator.

Layout on disk::

    workdir/checkpoints/
      2000/                         One complete checkpoint per kept step.
        _CHECKPOINT_METADATA        Orbax: item names and handlers, save time.
        commit_success.txt          Written last: the checkpoint is complete.
        state/                      Item `state` (TensorStore OCDBT: one zarr array
          _METADATA, _sharding,     per leaf). Arrays come back with the shardings
          manifest.ocdbt, d/, ...   of the abstract state given to the restore.
        data/                       Item `data` (`DataIteratorHandler`):
          process_0/                what process 0's iterator wrote with `save`
            position.json           (the training pipeline: faces drawn).
          process_1/ ...            one directory per process (host).
      4000.orbax-checkpoint-tmp-*/  A save in progress, or cut short by a crash:
                                    never read; `close` or a new manager deletes it.
      3000.unreadable-<time>/       A checkpoint that failed to restore, moved
                                    aside when an older one was restored instead.
    workdir/config.json             The run's config, written at every start: what
                                    the export and the photo tool rebuild the
                                    generators from.
    workdir/schedule.json           The learning-rate schedule in steps, written when
                                    the run starts afresh: a resumed run keeps it.

A save writes into the temporary directory and renames it to the step when
every process has finished (on GCS, which cannot rename, the step directory
is complete once `commit_success.txt` exists), so a complete checkpoint is
never replaced by a partial one.

Saves follow Orbax's default policy: every `config.checkpoint_every_steps`
steps, the first step of a run that has no checkpoint, and a preemption.
The newest `config.keep_checkpoints` are kept, plus every
`config.keep_checkpoints_every_steps`-th step (0: none).

Preemption: with several processes, `jax.distributed` catches SIGTERM and its
preemption sync manager picks the step at which all hosts save (Orbax's
`reached_preemption`). A single process has no such manager, so
`install_preemption_handler` installs a SIGTERM handler that only records the
request; `preemption_requested` reports either. The loop then saves, waits for
the save and exits.
"""

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

STATE_ITEM = "state"
DATA_ITEM = "data"
CHECKPOINTS_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"
SCHEDULE_FILE = "schedule.json"
# Orbax names a save in progress <step><suffix>-<time>.
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"

PyTree = Any

# Set by the SIGTERM handler of a single-process run; read between steps.
_sigterm_received = threading.Event()


class CheckpointableIterator(Protocol):
    """A data iterator whose position can be written to and read from a directory.

    `directory` is a path string (local or gs://, open it with etils.epath). It
    is a temporary directory that is renamed once the checkpoint is complete, so
    what is written there must not record its own absolute path.
    """

    def save(self, directory: str) -> None: ...

    def restore(self, directory: str) -> None: ...


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves each process's data iterator in `process_<index>/` of the item directory.

    Every host reads its own shard of the data, so every host has its own
    iterator position to save and to restore. The save is synchronous: the
    position is captured at the step being checkpointed.
    """

    def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
        process_directory = _process_directory(directory)
        process_directory.mkdir(parents=True, exist_ok=True)
        args.iterator.save(os.fspath(process_directory))

    def restore(
        self, directory: epath.Path, args: "DataIteratorRestore | None" = None
    ) -> CheckpointableIterator:
        if args is None:
            raise ValueError(
                "Restoring the data item needs the iterator to restore into: pass "
                "DataIteratorRestore(iterator)."
            )
        process_directory = _process_directory(directory)
        if not process_directory.exists():
            found = sorted(path.name for path in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(
                f"No data iterator state for process {jax.process_index()} in {directory} "
                f"(found: {found or 'nothing'}). Resume with as many processes as the run "
                "that wrote the checkpoint."
            )
        args.iterator.restore(os.fspath(process_directory))
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    """Save args of the `data` item: the iterator whose position is written."""

    iterator: CheckpointableIterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    """Restore args of the `data` item: the iterator moved to the saved position."""

    iterator: CheckpointableIterator


def _process_directory(item_directory: epath.Path) -> epath.Path:
    return epath.Path(item_directory) / f"process_{jax.process_index()}"


class UnreadableCheckpointsError(RuntimeError):
    """Raised when checkpoints exist but none of them can be restored."""


def create_checkpoint_manager(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict
) -> ocp.CheckpointManager:
    """Returns an asynchronous manager of `workdir/checkpoints/` with the config's policies."""
    preservation_policies = [ocp.checkpoint_managers.LatestN(n=config.keep_checkpoints)]
    if config.keep_checkpoints_every_steps:
        preservation_policies.append(
            ocp.checkpoint_managers.EveryNSteps(interval_steps=config.keep_checkpoints_every_steps)
        )
    options = ocp.CheckpointManagerOptions(
        # Only the interval is set, so Orbax's default save-decision policy stays in
        # force: the interval, the first step of a fresh run, and preemptions.
        save_interval_steps=config.checkpoint_every_steps,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preservation_policies),
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
        epath.Path(workdir) / CHECKPOINTS_SUBDIR,
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            DATA_ITEM: DataIteratorHandler(),
        },
        options=options,
    )


def restore_or_initialize(
    manager: ocp.CheckpointManager,
    abstract_state: PyTree,
    init_fn: Callable[[], PyTree],
    data_iterator: CheckpointableIterator,
) -> tuple[PyTree, int | None]:
    """Restores the newest readable checkpoint, or calls `init_fn` if there is none.

    `abstract_state` is the state's structure with `jax.ShapeDtypeStruct` leaves
    that carry the target shardings (`jax.eval_shape` of a jitted init with
    `out_shardings` gives it); restored arrays get those shardings. The data
    iterator is moved to the saved position in place. Returns the state and the
    restored step (None when initialized).

    A checkpoint that cannot be read is skipped with a warning that names it, and
    the one before is tried; if an older one is restored, the unreadable newer ones
    are moved aside so that this run can save those steps again. If none can be
    read, raises `UnreadableCheckpointsError`.
    """
    _check_abstract_state(abstract_state)
    unreadable_steps = []
    failures = []
    last_error = None
    for step in sorted(manager.all_steps(), reverse=True):
        error = None
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                        DATA_ITEM: DataIteratorRestore(data_iterator),
                    }
                ),
            )
        except Exception as caught:  # Whatever the cause, this checkpoint cannot be used.
            error = caught
        if not _true_on_all_processes(error is None):
            cause = _describe(error) if error else "unreadable on another process"
            failure = f"step {step} at {_step_path(manager, step)} ({cause})"
            logging.warning("Cannot read the checkpoint of %s; trying the one before.", failure)
            unreadable_steps.append(step)
            failures.append(failure)
            last_error = error or last_error
            continue
        _move_aside(manager, unreadable_steps)
        state = restored[STATE_ITEM]
        logging.info(
            "Restored the checkpoint of step %d from %s: items %r (%d arrays) and %r "
            "(data iterator of process %d).",
            step,
            _step_path(manager, step),
            STATE_ITEM,
            len(jax.tree.leaves(state)),
            DATA_ITEM,
            jax.process_index(),
        )
        return state, step
    if failures:
        raise UnreadableCheckpointsError(
            f"None of the {len(failures)} checkpoints in {manager.directory} can be read:\n  "
            + "\n  ".join(failures)
            + "\nCheck that the model config and the number of processes match the run that "
            "wrote them, or move the directory away to train from scratch."
        ) from last_error
    logging.info("No checkpoint in %s: initializing a new train state.", manager.directory)
    return init_fn(), None


def _true_on_all_processes(value: bool) -> bool:
    """All processes must resume from the same step, even if only one failed to read it."""
    if jax.process_count() == 1:
        return value
    return bool(np.all(multihost_utils.process_allgather(np.array(value))))


def _describe(error: Exception, max_chars: int = 400) -> str:
    """The error's type and message, cut short: TensorStore appends kilobytes of specs."""
    message = f"{type(error).__name__}: {error}"
    return message if len(message) <= max_chars else message[:max_chars] + " ..."


def _check_abstract_state(abstract_state: PyTree) -> None:
    unsharded = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None
    ]
    if unsharded:
        raise ValueError(
            f"abstract_state leaves without a sharding: {', '.join(unsharded[:5])}"
            f"{' ...' if len(unsharded) > 5 else ''}. Restoring needs the target sharding of "
            "every array: build the abstract state with jax.eval_shape of the jitted init "
            "function that has out_shardings."
        )


def _step_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    # The manager uses Orbax's default step names: the step number itself.
    return manager.directory / str(step)


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames unreadable checkpoints to `<step>.unreadable-<time>`, which Orbax ignores.

    Left in place, the newest of them would stay the manager's latest step, and
    Orbax saves no step at or below the latest one.
    """
    if not steps:
        return
    if jax.process_index() == 0:
        suffix = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            set_aside = manager.directory / f"{step}.unreadable-{suffix}"
            _step_path(manager, step).rename(set_aside)
            logging.warning(
                "Moved the unreadable checkpoint of step %d to %s; it will not be used.",
                step,
                set_aside,
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("faceage_jax.checkpointing.move_aside")
    manager.reload()


def save(
    manager: ocp.CheckpointManager, step: int, state: PyTree, data_iterator: CheckpointableIterator
) -> bool:
    """Starts saving `state` and the iterator position as the checkpoint of `step`.

    The caller decides when (`manager.should_save(step)`, the last step, or
    `preemption_requested`); every process calls it at the same step. The arrays
    are written in the background; the iterator is saved before this returns.
    Returns whether a save was started: a step already saved is not saved again.
    """
    if step in manager.all_steps():
        return False
    return manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                DATA_ITEM: DataIteratorSave(data_iterator),
            }
        ),
        force=True,
    )


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for the saves under way and closes `manager`; a failed save leaves no trace.

    Call it once at the end of a run, also one that dies (from a `finally`): the
    saves that can complete do, so the last good checkpoint stays, and the
    temporary directory of a save that failed is removed (a new manager would
    remove it too, but a run that is never resumed would keep it).
    """
    try:
        manager.wait_until_finished()
    finally:
        manager.close()
        if jax.process_index() == 0:
            for partial in manager.directory.glob(f"*{TMP_DIR_SUFFIX}*"):
                logging.warning("Removing %s, left by a save that failed.", partial)
                partial.rmtree(missing_ok=True)


def install_preemption_handler() -> None:
    """On a single process, makes SIGTERM request a checkpoint instead of killing the process.

    Call it from the main thread before the training loop. With several
    processes, nothing is installed: `jax.distributed` already handles SIGTERM
    and makes all hosts agree on the step to save.
    """
    if jax.process_count() > 1:
        logging.info("Preemption: relying on JAX's preemption sync manager across processes.")
        return
    _sigterm_received.clear()
    signal.signal(signal.SIGTERM, _record_sigterm)
    logging.info("Preemption: SIGTERM will save a checkpoint at the current step and stop.")


def _record_sigterm(signum, frame) -> None:
    del signum, frame  # Only the request matters; the loop acts on it between steps.
    _sigterm_received.set()
    # A second SIGTERM kills the process as usual, should the loop never get to stop.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def preemption_requested(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether training must save `step` now and stop.

    True after a SIGTERM caught by `install_preemption_handler`, or when all
    hosts have reached the preemption step chosen by JAX.
    """
    requested = _sigterm_received.is_set() or manager.reached_preemption(step)
    if requested:
        logging.warning(
            "Preemption requested: saving the checkpoint of step %d and stopping.", step
        )
    return requested


def restore_generator_params(
    workdir: str | os.PathLike, abstract_params: PyTree, step: int | None = None
) -> tuple[PyTree, int]:
    """Only the generators' parameters of a checkpoint, for evaluation and export.

    `abstract_params` is {'young_to_old': ..., 'old_to_young': ...} with
    `jax.ShapeDtypeStruct` leaves (their shardings say where the arrays go). Reads
    the newest checkpoint, or `step`; nothing else of the state is read, so any
    number of devices can read a checkpoint that any number wrote. Raises
    FileNotFoundError, naming what exists, when there is no such checkpoint.
    """
    directory = epath.Path(workdir) / CHECKPOINTS_SUBDIR
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()},
        # Set as read_only implies them: Orbax warns about each one it has to change.
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint in {directory}: train first (python -m faceage_jax.main "
                "--config ... --workdir ...) or pass the workdir of a trained run."
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {directory}; the checkpoints are of steps "
                f"{steps}."
            )
        item = {"generator_params": abstract_params}
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeRestore(
                        item=item,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True,
                    )
                }
            ),
        )
    finally:
        manager.close()
    return restored[STATE_ITEM]["generator_params"], step


def _write_atomically(path: epath.Path, text: str) -> None:
    """Replaces `path` whole: a reader never sees a half-written file."""
    temporary = path.parent / f"{path.name}.tmp-{os.getpid()}"
    temporary.write_text(text)
    temporary.replace(path)


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes `workdir/config.json`."""
    _write_atomically(
        epath.Path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True)
    )


def save_schedule(workdir: str | os.PathLike, constant_steps: int, decay_steps: int) -> None:
    """Writes `workdir/schedule.json`: the learning-rate schedule the run started with."""
    text = json.dumps({"constant_steps": constant_steps, "decay_steps": decay_steps})
    _write_atomically(epath.Path(workdir) / SCHEDULE_FILE, text)


def load_schedule(workdir: str | os.PathLike) -> tuple[int, int] | None:
    """(constant_steps, decay_steps) the run in `workdir` started with; None if not recorded."""
    path = epath.Path(workdir) / SCHEDULE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return int(data["constant_steps"]), int(data["decay_steps"])


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was started with, over today's defaults.

    Fields added since the run take their defaults. Raises FileNotFoundError,
    saying what to pass instead, when the workdir has no config.json.
    """
    from faceage_jax import defaults

    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not the workdir of a training run, or the "
            "run predates config.json; pass the run's config with --config configs/<name>.py."
        )
    config = defaults.get_config()
    config.update(json.loads(path.read_text()))
    return config
