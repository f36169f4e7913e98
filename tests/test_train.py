"""The training job: validation, exact resume, preemption, NaN stop, multi-host, outputs."""

import logging
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from faceage_jax import config_validation, cyclegan, runtime, train
from input_pipeline import dataset, pipeline, synthetic
from tests import helpers
from tests.helpers import free_port, start_python
from tests.random_batches import RandomBatches


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """A data dir (synthetic faces built once) shared by the runs."""
    root = tmp_path_factory.mktemp("train_loop")
    return {"data_dir": str(root / "tfds")}


def make_config(data_dir, **overrides):
    return helpers.make_config(data_dir=data_dir, **overrides)


def start_worker(
    shared_dirs,
    workdir,
    num_steps,
    *,
    process_id=0,
    num_processes=1,
    port=0,
    devices=4,
    data="pipeline",
    env=None,
):
    args = [workdir, shared_dirs["data_dir"], num_steps, process_id, num_processes, port, devices]
    return start_python(helpers.REPO_ROOT / "tests" / "train_worker.py", *args, data, env=env)


def finish(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-5000:]
    return output


def saved_steps(workdir) -> list[int]:
    checkpoints = epath.Path(workdir) / "checkpoints"
    if not checkpoints.exists():
        return []
    return sorted(int(path.name) for path in checkpoints.iterdir() if path.name.isdigit())


def load_final_state(workdir) -> dict[str, np.ndarray]:
    """What tests/train_worker.py wrote: state leaves, network outputs, the next batch."""
    with np.load(epath.Path(workdir) / "final_state.npz") as state:
        return dict(state)


def assert_bitwise_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_bad_config_fails_before_any_work(tmp_path):
    config = make_config(str(tmp_path / "tfds"), batch_size=-4)
    with pytest.raises(config_validation.ConfigError):
        train.train_and_evaluate(config, str(tmp_path / "workdir"))
    assert not (tmp_path / "tfds").exists()
    assert not (tmp_path / "workdir").exists()


# --- The loop in this process ------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, shared_dirs):
    config = make_config(
        shared_dirs["data_dir"], num_train_steps=8, checkpoint_every_steps=2, log_every_steps=2
    )
    batches = RandomBatches(config.batch_size, config.image_size, nan_at_batch=4)
    # Batch 4 (0-based) is the fifth step's.
    with pytest.raises(train.NonFiniteLossError, match=r"Step 5: loss .*generator"):
        train.train_and_evaluate(config, str(tmp_path), train_iterator=batches)
    steps = saved_steps(tmp_path)
    assert steps and max(steps) == 4, steps


@pytest.mark.slow
def test_run_writes_checkpoints_tensorboard_logs_and_sample_grids(
    tmp_path, shared_dirs, monkeypatch
):
    config = make_config(shared_dirs["data_dir"], num_train_steps=4, sample_every_steps=2)
    # A relative workdir, as `make demo` gives (Orbax itself takes only absolute paths).
    monkeypatch.chdir(tmp_path)
    state = train.train_and_evaluate(config, "runs/demo")
    workdir = tmp_path / "runs" / "demo"
    assert int(state.step) == 4
    assert 4 in saved_steps(workdir)
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    grids = sorted(path.name for path in (workdir / "samples").iterdir())
    assert grids == ["step_00000002.png", "step_00000004.png"]
    assert not (workdir / "eval").exists()  # eval_every_steps=0: no evaluation.


@pytest.mark.slow
def test_pool_size_zero_trains_saves_and_resumes(tmp_path, shared_dirs):
    config = make_config(shared_dirs["data_dir"], pool_size=0, num_train_steps=2)
    train.train_and_evaluate(config, str(tmp_path))
    config.num_train_steps = 4
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4
    assert state.pools == {}
    assert saved_steps(tmp_path) == [2, 4]


@pytest.mark.slow
def test_the_schedule_is_logged_in_steps_and_kept_by_a_resumed_run(tmp_path, shared_dirs, caplog):
    caplog.set_level(logging.INFO)
    config = make_config(shared_dirs["data_dir"], num_train_steps=4, log_every_steps=1)
    train.train_and_evaluate(config, str(tmp_path))
    assert "Learning rate: 0.0002 for 2 steps, then linear to 0 over 2 steps." in caplog.text
    rates = helpers.logged_scalars(tmp_path, ("learning_rate",))
    assert {step: rates[step]["learning_rate"] for step in rates} == pytest.approx(
        {1: 2e-4, 2: 2e-4, 3: 2e-4, 4: 1e-4}  # The rate each step trained with.
    )
    caplog.clear()
    config.num_train_steps = 6  # Asked to go on: the run keeps its schedule, and says so.
    train.train_and_evaluate(config, str(tmp_path))
    assert "then linear to 0 over 2 steps (as this run started)" in caplog.text
    assert "the run keeps the one it started with" in caplog.text
    assert "Steps 5 to 6 train at learning rate 0" in caplog.text
    rates = helpers.logged_scalars(tmp_path, ("learning_rate",))
    assert rates[5]["learning_rate"] == 0 and rates[6]["learning_rate"] == 0


def test_bfloat16_on_a_cpu_without_amx_is_warned_about(caplog):
    caplog.set_level(logging.WARNING)
    avx2 = runtime.CpuInfo("Old CPU", 2, frozenset({"avx2", "avx512f"}))
    amx = runtime.CpuInfo("New CPU", 2, frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    zen4 = runtime.CpuInfo("Zen 4", 2, frozenset({"avx512f", "avx512_bf16"}))
    train.warn_if_bfloat16_on_cpu(helpers.make_config(compute_dtype="float32"), avx2)
    train.warn_if_bfloat16_on_cpu(helpers.make_config(compute_dtype="bfloat16"), amx)
    assert not caplog.records
    train.warn_if_bfloat16_on_cpu(helpers.make_config(compute_dtype="bfloat16"), zen4)
    assert "without AMX (Zen 4)" in caplog.text
    caplog.clear()
    train.warn_if_bfloat16_on_cpu(helpers.make_config(compute_dtype="bfloat16"), avx2)
    assert "without AMX (Old CPU)" in caplog.text and "slower than in float32" in caplog.text
    assert "--config.compute_dtype" in caplog.text


class FailingSaves(RandomBatches):
    """Random batches whose position cannot be saved from `fail_at_batch` on."""

    def __init__(self, *args, fail_at_batch):
        super().__init__(*args)
        self.fail_at_batch = fail_at_batch

    def save(self, directory):
        if self.position >= self.fail_at_batch:
            raise OSError("disk full (simulated)")
        super().save(directory)


@pytest.mark.slow
def test_a_failed_save_leaves_no_partial_directory_and_the_last_good_checkpoint(
    tmp_path, shared_dirs
):
    config = make_config(shared_dirs["data_dir"], num_train_steps=6)
    batches = FailingSaves(config.batch_size, config.image_size, fail_at_batch=4)
    with pytest.raises(OSError, match="disk full"):
        train.train_and_evaluate(config, str(tmp_path), train_iterator=batches)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


# --- Separate processes --------------------------------------------------------------------


RESUMED_RUN_STEPS = 16  # Checkpoints every 2 steps (test config).


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, shared_dirs):
    """The final state of a run of RESUMED_RUN_STEPS steps that nothing interrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    finish(start_worker(shared_dirs, workdir, RESUMED_RUN_STEPS))
    state = load_final_state(workdir)
    # What the comparisons below cover: every part of the state, and the data position.
    for part in ["generator_params", "discriminator_opt_state", "pools['old'].images", "rng"]:
        assert any(name.startswith(f"state.{part}") for name in state), part
    assert int(state["state.step"]) == RESUMED_RUN_STEPS
    assert state["next_batch/young"].shape == (4, 32, 32, 3)
    return state


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted_run")
def test_stopped_twice_and_resumed_ends_bitwise_equal_to_an_uninterrupted_run(
    tmp_path, shared_dirs, uninterrupted_run
):
    # Stopped as a preempted job is (SIGTERM: the current step is saved, exit 0), each
    # time once the run has saved a checkpoint of its own, then resumed to the end.
    stopped_at = []
    for _ in range(2):
        newest = max(saved_steps(tmp_path), default=0)
        worker = start_worker(shared_dirs, tmp_path, RESUMED_RUN_STEPS)
        wait_for(lambda n=newest: max(saved_steps(tmp_path), default=0) > n, worker, "checkpoint")
        worker.send_signal(signal.SIGTERM)
        output = finish(worker)
        assert "after a preemption request" in output, output[-3000:]
        if stopped_at:
            assert f"Restored the checkpoint of step {stopped_at[-1]} " in output, output[-3000:]
        stopped_at.append(max(saved_steps(tmp_path)))
    assert stopped_at[0] < stopped_at[1] < RESUMED_RUN_STEPS, stopped_at
    output = finish(start_worker(shared_dirs, tmp_path, RESUMED_RUN_STEPS))
    assert f"Restored the checkpoint of step {stopped_at[1]} " in output, output[-3000:]
    assert_bitwise_equal(load_final_state(tmp_path), uninterrupted_run)


def wait_for(condition, process, what, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.005)


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted_run")
def test_killed_at_random_points_and_during_a_save_ends_bitwise_equal(
    tmp_path, shared_dirs, uninterrupted_run
):
    checkpoints = tmp_path / "checkpoints"
    slow_saves = {"SLOW_DATA_SAVES": "0.3"}  # A window to kill a save in.

    def saving():
        return checkpoints.exists() and any(checkpoints.glob("*.orbax-checkpoint-tmp*"))

    # 1. During the save of a checkpoint, after the first one.
    worker = start_worker(shared_dirs, tmp_path, RESUMED_RUN_STEPS, env=slow_saves)
    wait_for(lambda: saved_steps(tmp_path) and saving(), worker, "save after the first")
    kill(worker)
    assert saving(), "the kill was meant to cut a save short"
    # 2., 3. At random times after the resumed run has saved a checkpoint of its own.
    delays = np.random.default_rng(20261202).uniform(0.0, 1.0, size=2)
    for delay in delays:
        newest = max(saved_steps(tmp_path))
        worker = start_worker(shared_dirs, tmp_path, RESUMED_RUN_STEPS, env=slow_saves)
        wait_for(lambda n=newest: max(saved_steps(tmp_path)) > n, worker, "new checkpoint")
        time.sleep(delay)
        kill(worker)
    assert max(saved_steps(tmp_path)) < RESUMED_RUN_STEPS, "the kills came too late"
    finish(start_worker(shared_dirs, tmp_path, RESUMED_RUN_STEPS))

    assert_bitwise_equal(load_final_state(tmp_path), uninterrupted_run)
    assert not list(checkpoints.glob("*.orbax-checkpoint-tmp*"))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path, shared_dirs):
    run = start_python(
        "-m",
        "faceage_jax.main",
        "--config",
        "configs/test.py",
        "--workdir",
        tmp_path,
        f"--config.data_dir={shared_dirs['data_dir']}",
        "--config.num_train_steps=100000",
        "--config.checkpoint_every_steps=1000",
    )
    deadline = time.monotonic() + 600
    # Orbax saves the first step of a fresh run; training is under way once it is
    # there. The first sample grid (step 3) compiles the sampler, seconds that a
    # signal cannot interrupt: the bound below is for a run in its steady state.
    samples = tmp_path / "samples"
    while not (1 in saved_steps(tmp_path) and any(samples.glob("*.png"))) and run.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    run.send_signal(signal.SIGTERM)
    sigterm_time = time.monotonic()
    output, _ = run.communicate(timeout=60)
    seconds_to_exit = time.monotonic() - sigterm_time

    assert run.returncode == 0, output[-5000:]
    assert seconds_to_exit < 10, seconds_to_exit
    stopped = [line for line in output.splitlines() if "after a preemption request" in line]
    assert stopped, output[-3000:]
    stopped_step = int(stopped[-1].split("Stopped at step ")[1].split(" ")[0])
    assert stopped_step > 1
    assert max(saved_steps(tmp_path)) == stopped_step


def logged_losses(workdir) -> dict[int, dict[str, float]]:
    """{step: {loss name: value}} from the TensorBoard event file of a run."""
    return helpers.logged_scalars(workdir, ("generator/", "discriminator/"))


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_all_devices(tmp_path, shared_dirs):
    steps = 3
    single = tmp_path / "single"
    finish(start_worker(shared_dirs, single, steps, devices=4, data="random"))

    multi = tmp_path / "multi"
    port = free_port()
    workers = [
        start_worker(
            shared_dirs,
            multi,
            steps,
            process_id=index,
            num_processes=2,
            port=port,
            devices=2,
            data="random",
        )
        for index in range(2)
    ]
    for worker in workers:
        finish(worker)

    # Compare every loss of every step (logged each step). Step 1 starts from the same
    # parameters. After it, gloo's summation order differs from one process's, and Adam
    # turns the rounding noise of near-zero gradients into whole steps of the learning
    # rate, so parameters are no measure of equality. Measured: the losses differ by
    # 2e-7, 1e-5 and 5e-5 (relative) at steps 1, 2, 3; each tolerance is ~10x that.
    # A wrong data slice shows at step 1, gradients averaged per process at step 2.
    tolerances = {1: 2e-6, 2: 1e-4, 3: 5e-4}
    expected, actual = logged_losses(single), logged_losses(multi)
    assert sorted(expected) == sorted(actual) == list(range(1, steps + 1))
    for step in expected:
        assert expected[step].keys() == actual[step].keys()
        for name, value in expected[step].items():
            assert actual[step][name] == pytest.approx(value, rel=tolerances[step]), (step, name)


# --- It learns -----------------------------------------------------------------------------


def mean_apparent_age(images) -> float:
    return float(np.mean([synthetic.apparent_age(image) for image in np.asarray(images)]))


@pytest.mark.slow
def test_short_run_on_synthetic_faces_learns_to_age(tmp_path, shared_dirs):
    # Constant learning rate over the run; the reference rate 2e-4.
    config = make_config(
        shared_dirs["data_dir"],
        num_train_steps=150,
        num_epochs=1000,
        log_every_steps=50,
        checkpoint_every_steps=1000,
        sample_every_steps=1000,
    )
    faces = pipeline.load_sample_faces(dataset.prepare_dataset(config), config, 16)
    networks = cyclegan.create_networks(config)
    generator = networks.generator

    def measure(generator_params):
        young = jnp.asarray(faces["young"])
        return {
            "young": mean_apparent_age(faces["young"]),
            "old": mean_apparent_age(faces["old"]),
            "aged": mean_apparent_age(generator.apply(generator_params["young_to_old"], young)),
            "young_through_rejuvenator": mean_apparent_age(
                generator.apply(generator_params["old_to_young"], young)
            ),
        }

    untrained = measure(
        cyclegan.create_train_state(
            config,
            jax.random.key(config.seed),
            networks,
            cyclegan.create_optimizer(config, config.learning_rate),
            num_devices=1,
        ).generator_params
    )
    trained = measure(train.train_and_evaluate(config, str(tmp_path)).generator_params)
    print(f"apparent age, untrained: {untrained}\napparent age, trained:   {trained}")

    domain_gap = trained["old"] - trained["young"]
    assert domain_gap > 0.2, "the synthetic faces' age attribute separates the domains"
    # Aged young faces are measured most of the way to the old domain...
    assert trained["aged"] - trained["young"] > 0.5 * domain_gap

    # ...and it is the ageing generator's doing, not a blur: on the same young faces the
    # rejuvenating generator (nearly an identity there) gives a much younger measure.
    # Untrained generators both output grey blurs, measured alike.
    def ageing_margin(measured):
        return measured["aged"] - measured["young_through_rejuvenator"]

    assert ageing_margin(untrained) < 0.1
    assert ageing_margin(trained) > 0.2
