"""Checkpoints: exact roundtrip, policies, damaged checkpoints, per-process data, SIGTERM."""

import functools
import logging
import pathlib
import queue
import shutil
import signal
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from faceage_jax import checkpointing
from tests.helpers import free_port, make_config, start_python


class CountingIterator:
    """Stands in for the data iterator: its position is one integer, saved in a file."""

    def __init__(self, position: int = 0):
        self.position = position

    def save(self, directory: str) -> None:
        (epath.Path(directory) / "position.txt").write_text(str(self.position))

    def restore(self, directory: str) -> None:
        self.position = int((epath.Path(directory) / "position.txt").read_text())


def checkpoint_config(every: int = 1, keep: int = 3, keep_every: int = 0):
    return make_config(
        checkpoint_every_steps=every, keep_checkpoints=keep, keep_checkpoints_every_steps=keep_every
    )


def state_shardings():
    mesh = jax.make_mesh((4,), ("data",))
    replicated = NamedSharding(mesh, P())
    return {
        "params": replicated,
        "image_pool": NamedSharding(mesh, P("data")),
        "step": replicated,
        "rng": replicated,
    }


def make_state(step: jax.Array):
    """A small train state: replicated params, a batch-sharded image pool, a typed key."""
    rng = jax.random.key(step)
    params_rng, pool_rng = jax.random.split(rng)
    return {
        "params": jax.random.normal(params_rng, (3, 5)),
        "image_pool": jax.random.uniform(pool_rng, (8, 2, 2, 3), minval=-1.0, maxval=1.0),
        "step": step,
        "rng": jax.random.fold_in(rng, 7),
    }


@functools.cache
def jitted_make_state():
    return jax.jit(make_state, out_shardings=state_shardings())


def state_init_fn(step: int):
    """The init function of the trainer: no arguments, a state with the target shardings."""
    return functools.partial(jitted_make_state(), jnp.int32(step))


def save_steps(manager, steps):
    """Saves each step the manager's policy asks for; the iterator position is 10 x the step."""
    for step in steps:
        if manager.should_save(step):
            checkpointing.save(manager, step, state_init_fn(step)(), CountingIterator(10 * step))
    manager.wait_until_finished()


@pytest.fixture
def open_manager(tmp_path):
    """Opens a manager of tmp_path/checkpoints as a new run would; all are closed afterwards."""
    managers = []

    def open_(config=None):
        managers.append(
            checkpointing.create_checkpoint_manager(tmp_path, config or checkpoint_config())
        )
        return managers[-1]

    yield open_
    for manager in managers:
        manager.close()


def restore(manager):
    # eval_shape of the jitted function itself: through a partial, shardings are lost.
    abstract_state = jax.eval_shape(jitted_make_state(), jnp.int32(0))
    iterator = CountingIterator()
    state, step = checkpointing.restore_or_initialize(
        manager, abstract_state, state_init_fn(0), iterator
    )
    return state, iterator, step


def checkpoint_dirs(tmp_path) -> list[str]:
    return sorted(path.name for path in (tmp_path / "checkpoints").iterdir() if path.is_dir())


def test_restored_state_is_bitwise_equal_with_the_same_shardings(open_manager):
    saved = state_init_fn(5)()
    manager = open_manager()
    checkpointing.save(manager, 5, saved, CountingIterator(position=50))
    manager.wait_until_finished()

    restored, iterator, step = restore(open_manager())

    assert step == 5
    assert iterator.position == 50
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    assert jax.tree.map(lambda array: array.sharding, restored) == state_shardings()
    saved_bits = jax.tree.map(np.asarray, saved | {"rng": jax.random.key_data(saved["rng"])})
    restored_bits = jax.tree.map(
        np.asarray, restored | {"rng": jax.random.key_data(restored["rng"])}
    )
    jax.tree.map(np.testing.assert_array_equal, restored_bits, saved_bits)
    assert restored_bits["step"] == 5


def test_empty_directory_initializes_the_state(open_manager):
    state, iterator, step = restore(open_manager())

    assert step is None
    assert int(state["step"]) == 0
    assert iterator.position == 0


def test_the_newest_checkpoint_is_restored(open_manager):
    save_steps(open_manager(), [2, 4, 6])

    state, iterator, step = restore(open_manager())

    assert (step, int(state["step"]), iterator.position) == (6, 6, 60)


def test_saves_the_first_step_then_every_interval(open_manager):
    manager = open_manager(checkpoint_config(every=3, keep=10))

    save_steps(manager, range(1, 11))

    assert manager.all_steps() == [1, 3, 6, 9]


def test_keeps_the_newest_n_and_every_kth_step(tmp_path, open_manager):
    manager = open_manager(checkpoint_config(keep=2, keep_every=3))

    save_steps(manager, range(1, 9))

    assert manager.all_steps() == [3, 6, 7, 8]
    assert checkpoint_dirs(tmp_path) == ["3", "6", "7", "8"]


def test_keep_every_zero_keeps_only_the_newest(open_manager):
    manager = open_manager(checkpoint_config(keep=2, keep_every=0))

    save_steps(manager, range(1, 6))

    assert manager.all_steps() == [4, 5]


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated_state": lambda step_dir: truncate(step_dir / "state" / "manifest.ocdbt"),
    "deleted_data": lambda step_dir: (step_dir / "data" / "process_0" / "position.txt").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_unreadable_newest_falls_back_to_the_one_before_with_a_warning(
    tmp_path, caplog, open_manager, damage
):
    save_steps(open_manager(), [2, 4])
    newest = tmp_path / "checkpoints" / "4"
    damage(newest)

    with caplog.at_level(logging.WARNING):
        state, iterator, step = restore(open_manager())

    assert (step, int(state["step"]), iterator.position) == (2, 2, 20)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("step 4" in message and str(newest) in message for message in warnings), warnings


@pytest.fixture(scope="module")
def pipeline_config(tmp_path_factory):
    """The test config over its synthetic faces, built once."""
    from input_pipeline import dataset

    config = make_config(data_dir=str(tmp_path_factory.mktemp("tfds")))
    return dataset.prepare_dataset(config), config


def test_corrupt_data_position_falls_back_at_restore_to_the_one_before(
    tmp_path, caplog, open_manager, pipeline_config
):
    from input_pipeline import pipeline

    builder, config = pipeline_config

    def train_iterator():
        return pipeline.create_train_iterator(builder, config, process_index=0, process_count=1)

    iterator = train_iterator()
    manager = open_manager()
    for step in [2, 4]:
        next(iterator)  # One batch per step.
        next(iterator)
        checkpointing.save(manager, step, state_init_fn(step)(), iterator)
    manager.wait_until_finished()
    position = tmp_path / "checkpoints" / "4" / "data" / "process_0" / "position.json"
    position.write_bytes(b"\x00garbage")

    abstract_state = jax.eval_shape(jitted_make_state(), jnp.int32(0))
    restored = train_iterator()
    with caplog.at_level(logging.WARNING):
        state, step = checkpointing.restore_or_initialize(
            open_manager(), abstract_state, state_init_fn(0), restored
        )

    assert (step, int(state["step"]), restored.images_read) == (2, 2, 2 * 4)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("step 4" in m and "Malformed data position" in m for m in warnings), warnings
    fresh = train_iterator()
    expected = [next(fresh) for _ in range(3)][-1]  # The batch of step 3.
    actual = next(restored)
    for domain in expected:
        np.testing.assert_array_equal(actual[domain], expected[domain])


def test_after_a_fallback_the_unreadable_step_is_moved_aside_and_saved_again(
    tmp_path, open_manager
):
    save_steps(open_manager(), [2, 4])
    truncate(tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt")
    manager = open_manager()
    restore(manager)

    assert [name.split("-")[0] for name in checkpoint_dirs(tmp_path)] == ["2", "4.unreadable"]
    assert manager.all_steps() == [2]
    assert checkpointing.save(manager, 4, state_init_fn(4)(), CountingIterator(40))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4]


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, open_manager):
    save_steps(open_manager(), [2, 4])
    for step in ("2", "4"):
        truncate(tmp_path / "checkpoints" / step / "state" / "manifest.ocdbt")

    with pytest.raises(checkpointing.UnreadableCheckpointsError, match="None of the 2 checkpoints"):
        restore(open_manager())


def test_a_save_cut_short_is_ignored_and_earlier_checkpoints_stay_intact(tmp_path, open_manager):
    save_steps(open_manager(), [2, 4])
    checkpoints = tmp_path / "checkpoints"
    # What a crash during the save of step 6 leaves: the temporary directory, half written.
    partial = checkpoints / "6.orbax-checkpoint-tmp"
    shutil.copytree(checkpoints / "4", partial)
    (partial / "commit_success.txt").unlink()
    truncate(partial / "state" / "manifest.ocdbt")
    manager = open_manager()

    state, iterator, step = restore(manager)

    assert (step, int(state["step"]), iterator.position) == (4, 4, 40)
    assert manager.all_steps() == [2, 4]
    assert (checkpoints / "2" / "commit_success.txt").exists()
    # The resumed run saves step 6 again; the leftover is gone by then.
    save_steps(manager, [6])
    assert checkpoint_dirs(tmp_path) == ["2", "4", "6"]


def test_data_handler_keeps_one_directory_per_process(tmp_path, monkeypatch):
    handler = checkpointing.DataIteratorHandler()
    item_directory = epath.Path(tmp_path) / "data"
    for process_index, position in [(0, 11), (1, 22)]:
        monkeypatch.setattr(jax, "process_index", lambda index=process_index: index)
        handler.save(item_directory, checkpointing.DataIteratorSave(CountingIterator(position)))

    assert sorted(path.name for path in item_directory.iterdir()) == ["process_0", "process_1"]
    restored_positions = []
    for process_index in [0, 1]:
        monkeypatch.setattr(jax, "process_index", lambda index=process_index: index)
        iterator = handler.restore(
            item_directory, checkpointing.DataIteratorRestore(CountingIterator())
        )
        restored_positions.append(iterator.position)
    assert restored_positions == [11, 22]


def test_data_handler_names_the_missing_process(tmp_path, monkeypatch):
    handler = checkpointing.DataIteratorHandler()
    item_directory = epath.Path(tmp_path) / "data"
    handler.save(item_directory, checkpointing.DataIteratorSave(CountingIterator(5)))
    monkeypatch.setattr(jax, "process_index", lambda: 3)

    with pytest.raises(FileNotFoundError, match=r"process 3 .*found: \['process_0'\]"):
        handler.restore(item_directory, checkpointing.DataIteratorRestore(CountingIterator()))


def test_abstract_state_without_shardings_is_rejected(open_manager):
    manager = open_manager()
    abstract_state = {"params": jax.ShapeDtypeStruct((3, 5), jnp.float32)}

    with pytest.raises(ValueError, match=r"\['params'\]"):
        checkpointing.restore_or_initialize(manager, abstract_state, dict, CountingIterator())


# A training loop as the trainer runs it: it checkpoints rarely, prints each step,
# and stops at the step where SIGTERM arrives. Arguments: workdir, process id,
# number of processes, coordinator port (used with 2 or more processes).
PREEMPTIBLE_LOOP = """
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from faceage_jax import checkpointing

workdir, process_id, num_processes, port = sys.argv[1], *map(int, sys.argv[2:])
if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)


class CountingIterator:
    position = 1000 * process_id

    def save(self, directory):
        (epath.Path(directory) / "position.txt").write_text(str(self.position))

    def restore(self, directory):
        self.position = int((epath.Path(directory) / "position.txt").read_text())


config = ml_collections.ConfigDict(
    {"checkpoint_every_steps": 1000, "keep_checkpoints": 3, "keep_checkpoints_every_steps": 0}
)
manager = checkpointing.create_checkpoint_manager(workdir, config)
checkpointing.install_preemption_handler()
mesh = jax.make_mesh((jax.device_count(),), ("data",))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
init_fn = jax.jit(lambda: {"step": jnp.int32(0)}, out_shardings=replicated)
iterator = CountingIterator()
state, _ = checkpointing.restore_or_initialize(
    manager, jax.eval_shape(init_fn), init_fn, iterator
)
train_step = jax.jit(lambda state: {"step": state["step"] + 1})
step = 0
while True:
    step += 1
    state = train_step(state)
    iterator.position += 1
    time.sleep(0.02)
    preempted = checkpointing.preemption_requested(manager, step)
    if preempted or manager.should_save(step):
        checkpointing.save(manager, step, state, iterator)
    print(f"step {step}", flush=True)
    if preempted:
        manager.wait_until_finished()
        manager.close()
        print(f"stopped at step {step}", flush=True)
        sys.exit(0)
"""


def start_loop(workdir, process_id: int, num_processes: int, port: int):
    """Starts PREEMPTIBLE_LOOP; returns the process and a queue of the lines it prints."""
    loop = start_python(
        "-c",
        PREEMPTIBLE_LOOP,
        workdir,
        process_id,
        num_processes,
        port,
        stderr=subprocess.DEVNULL,
    )
    printed = queue.Queue()
    threading.Thread(
        target=lambda: [printed.put(line.strip()) for line in loop.stdout], daemon=True
    ).start()
    return loop, printed


@pytest.mark.parametrize("num_processes", [1, 2], ids=["one_process", "two_processes"])
def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path, open_manager, num_processes):
    port = free_port()
    loops = [start_loop(tmp_path, index, num_processes, port) for index in range(num_processes)]
    # With several processes, the last one is preempted; all must stop at the same step.
    preempted, preempted_printed = loops[-1]
    try:
        while preempted_printed.get(timeout=60) != "step 5":
            pass
        sigterm_time = time.monotonic()
        preempted.send_signal(signal.SIGTERM)
        for loop, _ in loops:
            loop.wait(timeout=60)
        seconds_to_exit = time.monotonic() - sigterm_time
    finally:
        for loop, _ in loops:
            loop.kill()

    assert [loop.returncode for loop, _ in loops] == [0] * num_processes
    assert seconds_to_exit < 5.0
    last_lines = {list(printed.queue)[-1] for _, printed in loops}
    assert len(last_lines) == 1, last_lines
    stopped_step = int(last_lines.pop().removeprefix("stopped at step "))
    assert stopped_step >= 5
    # Step 1 (the first of a fresh run) and the step that SIGTERM interrupted.
    checkpoints = tmp_path / "checkpoints"
    assert sorted(int(path.name) for path in checkpoints.iterdir() if path.name.isdigit()) == [
        1,
        stopped_step,
    ]
    data_directory = checkpoints / str(stopped_step) / "data"
    saved_positions = [
        int((data_directory / f"process_{index}" / "position.txt").read_text())
        for index in range(num_processes)
    ]
    assert saved_positions == [1000 * index + stopped_step for index in range(num_processes)]
    replicated = NamedSharding(jax.make_mesh((4,), ("data",)), P())
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
    state, step = checkpointing.restore_or_initialize(
        open_manager(), abstract_state, dict, CountingIterator()
    )
    assert (step, int(state["step"])) == (stopped_step, stopped_step)
