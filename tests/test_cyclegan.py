"""The CycleGAN networks from a config, the update step, and its data parallelism."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from faceage_jax import cyclegan, parallel
from faceage_jax import defaults as default_config
from tests.helpers import (
    ONEDNN_CPU,
    abstract_params,
    count_params,
    make_config,
    onednn_matmul_sums,
)

# One epoch of 10 steps at the constant rate, one decaying (the test config's epochs).
SCHEDULE = cyclegan.Schedule(constant_steps=10, decay_steps=10)


def make_batch(batch_size=4, image_size=32, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch_size, image_size, image_size, 3)
    return {
        "young": rng.uniform(-1, 1, shape).astype(np.float32),
        "old": rng.uniform(-1, 1, shape).astype(np.float32),
    }


@functools.cache
def build_step(config_items, num_devices, optimizer=None):
    """(mesh, init, step) over the first `num_devices` devices; `optimizer` replaces Adam.

    Cached by the config's fields: a step is traced and compiled once however
    many tests run it.
    """
    config = make_config(**dict(config_items))
    mesh = parallel.create_mesh(jax.devices()[:num_devices])
    functions = cyclegan.create_step_functions(config, mesh, SCHEDULE, optimizer=optimizer)
    return mesh, functions.init, functions.step


SGD = optax.sgd(1.0)
# bfloat16 keeps ~3 significant digits: after a few steps the losses agree with
# float32's to ~0.2 % (measured 0.19 % at most, the test config, 3 steps).
BFLOAT16_LOSS_RTOL = 0.01


@functools.cache
def sgd_step(num_devices, parallelism="shard_map", residual_convs="direct", shard=None):
    """Parameters before and after one step, and its metrics, without pool.

    Plain SGD with rate 1 makes the parameter change the negative gradient, so
    comparing parameters compares gradients: Adam would hide a gradient summed
    instead of averaged (it is invariant to the gradient's scale). `shard`, a
    slice, picks some of `make_batch()`'s images, by default all.

    Direct convolutions by default: the gradient jumps where a ReLU input crosses
    zero, and one input of this batch lies 6e-7 from zero (image 2, the input of
    the second downsampling convolution when a generator translates back the
    other's output, in the cycle loss). The float32 rounding of a step with
    batch 1 per device differs from that of batch 4 on one device; direct
    convolutions keep the difference there at ~1e-7 and the sign holds, but
    Winograd F(4x4, 3x3) amplifies it to ~1e-5 and flips it, moving some
    gradients by ~1e-2 for a reason that has nothing to do with sharding. A 6x
    margin is luck, not a guarantee: a new XLA or another batch may flip it
    again. `test_sharded_step_equals_the_mean_of_single_device_steps_on_its_shards`
    does not depend on it.
    """
    config = (("pool_size", 0), ("parallelism", parallelism), ("residual_convs", residual_convs))
    mesh, init, step = build_step(config, num_devices, SGD)
    state = init(jax.random.key(0))
    before = jax.device_get((state.generator_params, state.discriminator_params))
    batch = jax.tree.map(lambda images: images[shard or slice(None)], make_batch())
    state, metrics = step(state, parallel.global_batch(mesh, batch))
    after = jax.device_get((state.generator_params, state.discriminator_params))
    return before, after, jax.device_get(metrics)


def assert_same_update(expected_grads, expected_metrics, grads, metrics):
    """Gradients and metrics of two steps agree up to float32 rounding."""
    for expected, actual in zip(
        jax.tree.leaves(expected_grads), jax.tree.leaves(grads), strict=True
    ):
        # Summation order differs with the device count: allow float32 rounding relative
        # to the tensor's scale, and 1e-6 for the pure-noise gradients (~1e-8) of biases
        # that feed instance norm. A summed-not-averaged gradient is off by 2-4x.
        scale = np.abs(expected).max()
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6 + 1e-5 * scale)
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.xdist_group("sgd_step")
@pytest.mark.parametrize(
    "num_devices, parallelism", [(2, "shard_map"), (4, "shard_map"), (4, "pmap")]
)
def test_sharded_step_equals_single_device_step(num_devices, parallelism):
    before, single, single_metrics = sgd_step(1)
    _, sharded, sharded_metrics = sgd_step(num_devices, parallelism)
    assert_same_update(
        jax.tree.map(np.subtract, before, single),
        single_metrics,
        jax.tree.map(np.subtract, before, sharded),
        sharded_metrics,
    )


@pytest.mark.slow
@pytest.mark.xdist_group("sgd_step")
def test_sharded_step_equals_the_mean_of_single_device_steps_on_its_shards():
    # The configuration's own convolutions (Winograd on CPU, the blocks scanned):
    # each device computes what one device computes on its shard, rounding
    # included, so only the average over devices is tested, at any margin.
    before, sharded, sharded_metrics = sgd_step(4, residual_convs="auto")
    shards = [sgd_step(1, residual_convs="auto", shard=slice(i, i + 1)) for i in range(4)]

    def mean(trees):
        return jax.tree.map(lambda *leaves: np.mean(leaves, axis=0), *trees)

    assert_same_update(
        mean([jax.tree.map(np.subtract, before, after) for _, after, _ in shards]),
        mean([metrics for _, _, metrics in shards]),
        jax.tree.map(np.subtract, before, sharded),
        sharded_metrics,
    )


@pytest.mark.slow
@pytest.mark.xdist_group("sgd_step")
def test_gradient_is_an_average_not_a_sum_over_devices():
    before, single, _ = sgd_step(1)
    _, sharded, _ = sgd_step(4, "shard_map")
    kernel = ("young_to_old", "params", "Conv_0", "kernel")

    def pick(tree):
        generator_params, _ = tree
        node = generator_params
        for key in kernel:
            node = node[key]
        return node

    single_step = np.abs(pick(before) - pick(single)).sum()
    sharded_step = np.abs(pick(before) - pick(sharded)).sum()
    assert single_step > 0
    assert sharded_step == pytest.approx(single_step, rel=1e-4)


class CountedLauncher:
    """The Adam step of the test config on 4 devices, counting its traces."""

    def __init__(self, parallelism):
        config = make_config(parallelism=parallelism)
        self.traces = 0
        adam = cyclegan.create_optimizer(config, cyclegan.create_learning_rate_fn(config, SCHEDULE))

        def counted_update(updates, opt_state, params):
            self.traces += 0.5  # Twice per trace: generators, then discriminators.
            return adam.update(updates, opt_state, params)

        self.mesh = parallel.create_mesh()
        functions = cyclegan.create_step_functions(
            config,
            self.mesh,
            SCHEDULE,
            optimizer=optax.GradientTransformation(adam.init, counted_update),
        )
        self.init, self.step = functions.init, functions.step

    def run(self, seeds):
        state = self.init(jax.random.key(0))
        for seed in seeds:
            state, metrics = self.step(
                state, parallel.global_batch(self.mesh, make_batch(seed=seed))
            )
        return state, metrics


@pytest.fixture(scope="module")
def launchers():
    """Both launchers after three steps with Adam and image pools on."""
    results = {}
    for parallelism in ["shard_map", "pmap"]:
        launcher = CountedLauncher(parallelism)
        results[parallelism] = (launcher, jax.device_get(launcher.run(seeds=[0, 1, 2])))
    return results


@pytest.mark.slow
@pytest.mark.xdist_group("launchers")
def test_shard_map_and_pmap_launchers_agree_with_pools_and_adam(launchers):
    _, shard_map_result = launchers["shard_map"]
    _, pmap_result = launchers["pmap"]
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        shard_map_result,
        pmap_result,
    )


@pytest.mark.slow
@pytest.mark.xdist_group("launchers")
@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_step_is_traced_once(launchers, parallelism):
    launcher, _ = launchers[parallelism]
    assert launcher.traces == 1


def last_conv_name(module_params):
    return max(
        (name for name in module_params["params"] if name.startswith("Conv_")),
        key=lambda name: int(name.split("_")[1]),
    )


def zero_last_conv(module_params):
    params = jax.tree.map(lambda x: x, module_params)
    name = last_conv_name(params)
    params["params"][name] = jax.tree.map(jnp.zeros_like, params["params"][name])
    return params


@pytest.mark.slow
def test_losses_of_zero_generators_and_discriminators_match_hand_formula():
    config = make_config()
    networks = cyclegan.create_networks(config)
    init = functools.partial(
        cyclegan.create_train_state, config, networks=networks, optimizer=SGD, num_devices=1
    )
    state = jax.jit(init)(jax.random.key(0))
    generator_params = jax.tree.map(zero_last_conv, state.generator_params, is_leaf=is_module)
    discriminator_params = jax.tree.map(
        zero_last_conv, state.discriminator_params, is_leaf=is_module
    )
    batch = make_batch()
    young, old = jnp.asarray(batch["young"]), jnp.asarray(batch["old"])
    generator_losses = functools.partial(
        cyclegan.generator_losses, networks=networks, config=config
    )
    _, (metrics, fake_old, fake_young) = jax.jit(generator_losses)(
        generator_params, discriminator_params, young, old
    )
    np.testing.assert_array_equal(fake_old, 0.0)
    mean_abs_young = np.abs(batch["young"]).mean()
    mean_abs_old = np.abs(batch["old"]).mean()
    # Zero scores against the real label 1: (0 - 1)^2 = 1 for each direction.
    assert float(metrics["generator/adversarial_young_to_old"]) == pytest.approx(1.0)
    assert float(metrics["generator/adversarial_old_to_young"]) == pytest.approx(1.0)
    # Reconstructions are zero images: cycle = 10 * mean|x|; identity = 0.5 * 10 * mean|x|.
    assert float(metrics["generator/cycle_young"]) == pytest.approx(10 * mean_abs_young)
    assert float(metrics["generator/cycle_old"]) == pytest.approx(10 * mean_abs_old)
    assert float(metrics["generator/identity_young"]) == pytest.approx(5 * mean_abs_young)
    assert float(metrics["generator/identity_old"]) == pytest.approx(5 * mean_abs_old)
    expected_total = 2.0 + 15 * mean_abs_young + 15 * mean_abs_old
    assert float(metrics["generator/total"]) == pytest.approx(expected_total, rel=1e-6)

    discriminator_losses = functools.partial(
        cyclegan.discriminator_losses, discriminator=networks.discriminator
    )
    _, d_metrics = jax.jit(discriminator_losses)(
        discriminator_params,
        {"young": young, "old": old},
        {"young": fake_young, "old": fake_old},
    )
    # 0.5 * ((0 - 1)^2 + (0 - 0)^2) per domain.
    assert float(d_metrics["discriminator/young"]) == pytest.approx(0.5)
    assert float(d_metrics["discriminator/old"]) == pytest.approx(0.5)
    assert float(d_metrics["discriminator/total"]) == pytest.approx(1.0)


def is_module(node):
    return isinstance(node, dict) and "params" in node


def generator_input_batches(config, batch_size=4):
    """Batch sizes of the generator calls in the generator loss's program, in order."""
    networks = cyclegan.create_networks(config)
    state = jax.eval_shape(
        lambda: cyclegan.create_train_state(config, jax.random.key(0), networks, SGD, num_devices=1)
    )
    images = jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.float32)
    loss = functools.partial(cyclegan.generator_losses, networks=networks, config=config)
    program = jax.make_jaxpr(loss)(
        state.generator_params, state.discriminator_params, images, images
    )
    # Each call of the (jitted) generator is one equation; its last input is the images.
    calls = [eqn for eqn in program.eqns if eqn.params.get("name") == "apply"]
    assert all(eqn.outvars[0].aval.shape[1:] == (32, 32, 3) for eqn in calls)
    return [eqn.invars[-1].aval.shape[0] for eqn in calls]


def test_identity_passes_run_only_when_lambda_identity_is_positive():
    # Each generator translates a batch of 4 and reconstructs a batch of 4; with the
    # identity loss on, the translation call also carries the 4 identity inputs.
    assert generator_input_batches(make_config(lambda_identity=0.5)) == [8, 8, 4, 4]
    assert generator_input_batches(make_config(lambda_identity=0.0)) == [4, 4, 4, 4]


def test_learning_rate_is_constant_then_decays_linearly_to_zero():
    config = make_config(learning_rate=2e-4, num_epochs=2, num_decay_epochs=2, num_train_steps=-1)
    schedule = cyclegan.create_schedule(config, steps_per_epoch=10)
    assert schedule == cyclegan.Schedule(constant_steps=20, decay_steps=20)
    learning_rate_fn = cyclegan.create_learning_rate_fn(config, schedule)
    # 20 constant steps, then 20 steps from 2e-4 down to 0.
    expected = {0: 2e-4, 19: 2e-4, 20: 2e-4, 25: 1.5e-4, 30: 1e-4, 35: 5e-5, 40: 0.0, 45: 0.0}
    for step, rate in expected.items():
        assert float(learning_rate_fn(step)) == pytest.approx(rate, rel=1e-6, abs=1e-12), step


@pytest.mark.parametrize(
    "epochs, steps, expected",
    [
        ((1, 1), 600, (300, 300)),  # Equal epochs, as the demo's, over 600 steps.
        ((100, 100), 1000, (500, 500)),
        ((3, 1), 600, (450, 150)),
        ((0, 1), 50, (0, 50)),
        ((1, 0), 50, (50, 0)),
        ((0, 0), 50, (50, 0)),
    ],
)
def test_num_train_steps_spans_the_schedule_in_the_epochs_proportions(epochs, steps, expected):
    config = make_config(num_epochs=epochs[0], num_decay_epochs=epochs[1], num_train_steps=steps)
    # Whatever an epoch is: the schedule is the steps asked for.
    for steps_per_epoch in (1, 58, 10_000):
        schedule = cyclegan.create_schedule(config, steps_per_epoch)
        assert schedule == cyclegan.Schedule(*expected)
        assert schedule.total_steps == steps


def test_a_600_step_run_is_not_left_at_learning_rate_zero():
    # The demo config of then (1 + 1 epochs) at 600 steps, 58 steps per epoch: 117 steps trained.
    config = make_config(learning_rate=2e-4, num_epochs=1, num_decay_epochs=1, num_train_steps=600)
    schedule = cyclegan.create_schedule(config, steps_per_epoch=58)
    learning_rate_fn = cyclegan.create_learning_rate_fn(config, schedule)
    expected = {0: 2e-4, 299: 2e-4, 300: 2e-4, 450: 1e-4, 599: 2e-4 / 300, 600: 0.0}
    for step, rate in expected.items():
        assert float(learning_rate_fn(step)) == pytest.approx(rate, rel=1e-5, abs=1e-12), step
    assert schedule.describe(2e-4) == "0.0002 for 300 steps, then linear to 0 over 300 steps"


@pytest.mark.slow
@pytest.mark.xdist_group("launchers")
def test_few_steps_on_a_fixed_batch_reduce_the_cycle_loss(launchers):
    launcher, _ = launchers["shard_map"]
    state = launcher.init(jax.random.key(0))
    batch = parallel.global_batch(launcher.mesh, make_batch())
    cycle = []
    for _ in range(8):
        state, metrics = launcher.step(state, batch)
        cycle.append(float(metrics["generator/cycle_young"] + metrics["generator/cycle_old"]))
    # Eight Adam steps at the reference rate 2e-4 take off about 9 %.
    assert cycle[-1] < 0.95 * cycle[0], cycle


@pytest.mark.slow
def test_bfloat16_step_tracks_the_float32_step():
    results = {}
    for dtype in ("float32", "bfloat16"):
        mesh, init, step = build_step((("compute_dtype", dtype),), 4)
        state = init(jax.random.key(0))
        for seed in range(3):
            state, metrics = step(state, parallel.global_batch(mesh, make_batch(seed=seed)))
        results[dtype] = jax.device_get(metrics), state.generator_params
    (metrics32, _), (metrics16, params16) = results["float32"], results["bfloat16"]
    assert metrics16["nonfinite_loss"] == 0.0
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params16)), (
        "parameters stay float32"
    )
    # Every loss term after three Adam steps, within bfloat16's rounding of float32's.
    for name, value in metrics32.items():
        np.testing.assert_allclose(metrics16[name], value, rtol=BFLOAT16_LOSS_RTOL, err_msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not ONEDNN_CPU, reason="XLA hands work to oneDNN only on x86 with AVX-512")
def test_bfloat16_step_on_a_cpu_sums_whole_blocks_in_onednn_matmuls():
    # oneDNN's AMX matmul can bring NaN into a sum whose length is not a multiple of
    # 32 (layers.ONEDNN_K_BLOCK); the bfloat16 step gave intermittent NaNs before.
    mesh, init, step = build_step((("compute_dtype", "bfloat16"),), 4)
    state = init(jax.random.key(0))
    hlo = step.lower(state, parallel.global_batch(mesh, make_batch())).compile().as_text()
    assert '"__onednn$convolution"' in hlo
    # At the test config's size XLA keeps that matmul (tests/test_layers.py has one it gives).
    lengths = onednn_matmul_sums(hlo)
    assert all(n <= 32 or n % 32 == 0 for n in lengths), lengths


@pytest.mark.slow
@pytest.mark.xdist_group("launchers")
def test_nonfinite_loss_is_flagged_in_the_metrics(launchers):
    launcher, _ = launchers["shard_map"]
    mesh, step = launcher.mesh, launcher.step
    state = launcher.init(jax.random.key(0))
    state, metrics = step(state, parallel.global_batch(mesh, make_batch()))
    assert float(metrics["nonfinite_loss"]) == 0.0
    bad = make_batch(seed=1)
    bad["old"][3, 0, 0, 0] = np.nan  # One pixel on the last device.
    _, metrics = step(state, parallel.global_batch(mesh, bad))
    assert float(metrics["nonfinite_loss"]) == 1.0


# --- The networks from a config ---------------------------------------------------------------


def test_default_config_builds_the_reference_networks():
    config = default_config.get_config()
    generator, discriminator = cyclegan.create_networks(config)
    assert count_params(abstract_params(generator, 128)) == 11_378_179
    assert count_params(abstract_params(discriminator, 128)) == 2_764_737


def test_residual_convs_auto_is_winograd_on_cpu_in_float32_only():
    config = default_config.get_config()
    assert jax.default_backend() == "cpu"
    assert cyclegan.create_networks(config).generator.winograd
    config.compute_dtype = "bfloat16"
    assert not cyclegan.create_networks(config).generator.winograd
    config.residual_convs = "winograd"
    assert cyclegan.create_networks(config).generator.winograd
    config.residual_convs = "direct"
    config.compute_dtype = "float32"
    assert not cyclegan.create_networks(config).generator.winograd


def convolutions_in_loop_fusions(hlo_text):
    """Names of compiled HLO's loop fusions that contain a convolution.

    XLA:CPU runs a convolution by its convolution library, alone or in a custom
    fusion; inside a loop fusion it is emitted as a naive elemental loop.
    """
    fusions = re.findall(r"fusion\(.*?kind=(\w+), calls=%([\w.\-]+)", hlo_text)
    loop_fusions = {name for kind, name in fusions if kind == "kLoop"}
    return [
        name
        for computation in re.split(r"\n(?=\S)", hlo_text)
        if (match := re.match(r"%([\w.\-]+) ", computation))
        and (name := match.group(1)) in loop_fusions
        and " convolution(" in computation
    ]


@pytest.mark.slow
def test_direct_residual_convs_are_not_scanned_on_cpu():
    # jax-ml/jax#12868: XLA:CPU emits a convolution's gradient inside a loop body
    # as a naive loop (the demo step ran 25x slower); the generator loops instead.
    assert jax.default_backend() == "cpu"
    config = default_config.get_config()
    config.update(ngf=32, n_res_blocks=2, residual_convs="direct")
    images = jnp.zeros((1, 64, 64, 3))

    def compiled_gradient(generator):
        def loss(params):
            return generator.apply(params, images).sum()

        params = generator.init(jax.random.key(0), images)
        return jax.jit(jax.grad(loss)).lower(params).compile().as_text()

    generator = cyclegan.create_networks(config).generator
    assert not generator.scan_blocks
    assert convolutions_in_loop_fusions(compiled_gradient(generator)) == []
    # What it avoids: the same generator with its blocks scanned.
    scanned = compiled_gradient(generator.clone(scan_blocks=True))
    assert convolutions_in_loop_fusions(scanned), (
        "no convolution in a loop fusion: XLA fixed it (direct convs may be scanned) "
        "or its HLO text format changed (fix `convolutions_in_loop_fusions`)"
    )
    config.residual_convs = "winograd"
    assert cyclegan.create_networks(config).generator.scan_blocks
