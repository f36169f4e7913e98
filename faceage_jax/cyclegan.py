"""CycleGAN training state and the per-device update step.

Needs only jax, flax and optax (no TensorFlow), so benchmarks and accelerator
checks can import it on machines that carry just the accelerator stack.

`create_networks` builds the two networks from a config and `create_step_functions`
compiles the initial state and the step over a mesh: the one wiring that
training, the benchmark and the tests share.

Domain A is young faces, domain B old faces. `young_to_old` and `old_to_young`
are the two generators; the `young` discriminator tells real young faces from
`old_to_young` outputs, the `old` one real old faces from `young_to_old` outputs.
"""

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from faceage_jax import image_pool, losses, models, parallel

GENERATORS = ("young_to_old", "old_to_young")
DOMAINS = ("young", "old")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RESIDUAL_CONVS = ("auto", "winograd", "direct")


class Networks(NamedTuple):
    """The network definitions; both generators share one, both discriminators the other."""

    generator: models.ResnetGenerator
    discriminator: models.PatchDiscriminator


def use_winograd(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.residual_convs` runs the residual blocks' convs by Winograd here.

    'auto' picks it on CPU in float32, where XLA's convolutions run near the
    machine's peak and 4x fewer multiplications make the step faster. On GPUs and
    TPUs the convolution libraries are left to choose their own algorithms.
    Measured on 2 cores at 64px, ngf/ndf 32, 6 blocks, batch 4: float32 Winograd
    6.55 images/s against direct 5.9 on an Intel Xeon with AMX (2026-12-06,
    before its transforms became single fused operations, which made it ~10 %
    faster still).

    In bfloat16 'auto' stays direct, for accuracy: Winograd F(4x4, 3x3) rounds
    its transformed tiles and kernels to bfloat16, and a generator (ngf 16, 3
    blocks, 64px) then differs from float32 by up to 0.12-0.16 (mean 0.017-0.025)
    where direct convolutions differ by 0.024-0.028 (mean 0.004), the bound the
    tests hold being 0.05 (mean 0.01). With oneDNN's convolutions
    (`compiler_options`) it was faster on the Xeon: 10.6-11.1 images/s against
    9.9-10.0 at 64px (ngf/ndf 32), 0.83-0.84 against 0.52-0.57 at the default
    config, batch 1 (2026-12-07), before `layers.valid_conv` made the direct
    step 12.3 and 0.77.
    """
    if config.residual_convs == "auto":
        return jax.default_backend() == "cpu" and config.compute_dtype == "float32"
    return config.residual_convs == "winograd"


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """XLA options for compiling the training step: oneDNN's kernels in bfloat16 on a CPU.

    XLA:CPU runs a bfloat16 convolution as a float32 one between conversions.
    `xla_cpu_experimental_onednn_custom_call` hands the convolutions (and one
    matmul, `layers.ONEDNN_K_BLOCK`) to oneDNN's bfloat16 kernels instead (AMX
    or AVX-512 BF16), which made the bfloat16 step 1.3x faster than float32 on
    an Intel Xeon with AMX (64px, ngf/ndf 32, batch 4: 5.9 to 12.3 images/s with
    `layers.valid_conv`; README, "Benchmarks"). In float32 it made that step no
    faster (8.61 / 9.11 against 8.79 / 8.58 images/s), so it is left off there.

    On 2026-12-07 this step gave intermittent non-finite losses from unchanged
    parameters and inputs (one 12-step benchmark run in about eight; in a loop,
    NaN from step 99 of 150), and was turned off. The likely cause is a oneDNN
    bug in the AMX matmul that XLA gives `layers.narrow_conv`'s input gradient,
    a sum over 147 taps: the bytes beyond a sum whose length is not a multiple
    of 32 reach the result. That sum is now padded to 160 with zeros; tests
    hold the oneDNN matmuls of the custom-gradient layers at the benchmark's
    sizes, and of the test config's step, to such lengths. The fault itself did
    not recur, with or without the padding (README, "Benchmarks"); a
    non-finite loss still stops a run at its last checkpoint
    (`train.NonFiniteLossError`).
    """
    if jax.default_backend() == "cpu" and config.compute_dtype == "bfloat16":
        return {"xla_cpu_experimental_onednn_custom_call": True}
    return {}


def create_networks(config: ml_collections.ConfigDict) -> Networks:
    """The generator and discriminator that `config` describes (a validated config)."""
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    winograd = use_winograd(config)
    generator = models.ResnetGenerator(
        ngf=config.ngf,
        n_res_blocks=config.n_res_blocks,
        n_downsample=config.n_downsample,
        dtype=dtype,
        winograd=winograd,
        # XLA:CPU emits a convolution's gradient inside a loop body as a naive
        # elemental loop (jax-ml/jax#12868), many times slower; Winograd's matrix
        # products are not affected. So direct convolutions loop on CPU.
        scan_blocks=winograd or jax.default_backend() != "cpu",
    )
    discriminator = models.PatchDiscriminator(
        ndf=config.ndf, n_layers=config.n_disc_layers, dtype=dtype
    )
    return Networks(generator, discriminator)


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step reads and writes; also what a checkpoint holds.

    `pools` leaves carry a leading device axis ([num_devices, pool_size, H, W, 3]
    in the global view): every device owns its pools; `pools` is empty when
    `pool_size` is 0. `rng` is raw uint32 key data so that it checkpoints like
    any array.
    """

    step: jax.Array
    generator_params: dict[str, Any]  # {'young_to_old': ..., 'old_to_young': ...}
    discriminator_params: dict[str, Any]  # {'young': ..., 'old': ...}
    generator_opt_state: optax.OptState
    discriminator_opt_state: optax.OptState
    pools: dict[str, image_pool.ImagePool]  # {'young': fakes of young, 'old': fakes of old}
    rng: jax.Array


def init_generator_params(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, Any]:
    """Freshly initialized parameters of both generators: {'young_to_old': ..., ...}."""
    generator = create_networks(config).generator
    size = config.image_size
    return {
        name: generator.init(jax.random.key(seed + index), jnp.zeros((1, size, size, 3)))
        for index, name in enumerate(GENERATORS)
    }


class Schedule(NamedTuple):
    """The learning rate over a run, in steps: constant, then linear to 0."""

    constant_steps: int
    decay_steps: int

    @property
    def total_steps(self) -> int:
        return self.constant_steps + self.decay_steps

    def describe(self, learning_rate: float) -> str:
        return (
            f"{learning_rate:g} for {self.constant_steps} steps, then linear to 0 over "
            f"{self.decay_steps} steps"
        )


def create_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedule:
    """`num_epochs` constant, then `num_decay_epochs` decaying; or `num_train_steps` so shared.

    With `num_train_steps` set, the schedule spans exactly that many steps, the
    constant part num_epochs / (num_epochs + num_decay_epochs) of it (all of it
    when both are 0), so a longer run is trained longer, not run at rate 0.
    """
    if config.num_train_steps > 0:
        total = config.num_train_steps
        epochs = config.num_epochs + config.num_decay_epochs
        constant = total if epochs == 0 else round(total * config.num_epochs / epochs)
        return Schedule(constant, total - constant)
    return Schedule(config.num_epochs * steps_per_epoch, config.num_decay_epochs * steps_per_epoch)


def create_learning_rate_fn(config: ml_collections.ConfigDict, schedule: Schedule):
    """`config.learning_rate` for `schedule.constant_steps`, then linear to 0 over the rest."""
    return optax.join_schedules(
        [
            optax.constant_schedule(config.learning_rate),
            optax.linear_schedule(config.learning_rate, 0.0, max(schedule.decay_steps, 1)),
        ],
        boundaries=[schedule.constant_steps],
    )


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn
) -> optax.GradientTransformation:
    """Adam as the reference uses it; each of the four networks has its own state."""
    return optax.adam(learning_rate_fn, b1=config.adam_b1, b2=config.adam_b2)


def create_train_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    networks: Networks,
    optimizer: optax.GradientTransformation,
    num_devices: int,
) -> TrainState:
    """A fresh state; wrap in `jax.eval_shape` for the abstract state (restore, shardings)."""
    image_shape = (config.image_size, config.image_size, 3)
    images = jnp.zeros((1, *image_shape), jnp.float32)
    rng, *keys = jax.random.split(rng, 5)
    generator_params = {
        name: networks.generator.init(key, images)
        for name, key in zip(GENERATORS, keys[:2], strict=True)
    }
    discriminator_params = {
        name: networks.discriminator.init(key, images)
        for name, key in zip(DOMAINS, keys[2:], strict=True)
    }
    pools = {}  # pool_size 0: no pools, nothing to store (Orbax refuses zero-size arrays).
    if config.pool_size:
        pool = image_pool.create(config.pool_size, image_shape)
        stack = lambda x: jnp.stack([x] * num_devices)
        pools = {name: jax.tree.map(stack, pool) for name in DOMAINS}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        generator_params=generator_params,
        discriminator_params=discriminator_params,
        generator_opt_state=optimizer.init(generator_params),
        discriminator_opt_state=optimizer.init(discriminator_params),
        pools=pools,
        rng=jax.random.key_data(rng),
    )


def generator_losses(generator_params, discriminator_params, young, old, *, networks, config):
    """Generator objective with the discriminators held fixed.

    Returns (total, (metrics, fake_old, fake_young)). Each generator runs once on
    the concatenation of its translation input and, when the identity loss is
    on, its identity input: instance norm is per image, so batching them is exact.
    """
    num = young.shape[0]
    # One trace of the generator for its four calls (XLA inlines it: the same program).
    generate, discriminator = jax.jit(networks.generator.apply), networks.discriminator
    use_identity = config.lambda_identity > 0
    to_old_input = jnp.concatenate([young, old]) if use_identity else young
    to_young_input = jnp.concatenate([old, young]) if use_identity else old
    to_old_output = generate(generator_params["young_to_old"], to_old_input)
    to_young_output = generate(generator_params["old_to_young"], to_young_input)
    fake_old, fake_young = to_old_output[:num], to_young_output[:num]
    reconstructed_young = generate(generator_params["old_to_young"], fake_old)
    reconstructed_old = generate(generator_params["young_to_old"], fake_young)

    metrics = {
        "generator/adversarial_young_to_old": losses.least_squares(
            discriminator.apply(discriminator_params["old"], fake_old), losses.REAL
        ),
        "generator/adversarial_old_to_young": losses.least_squares(
            discriminator.apply(discriminator_params["young"], fake_young), losses.REAL
        ),
        "generator/cycle_young": config.lambda_cycle * losses.l1(reconstructed_young, young),
        "generator/cycle_old": config.lambda_cycle * losses.l1(reconstructed_old, old),
    }
    if use_identity:
        identity_weight = config.lambda_identity * config.lambda_cycle
        metrics["generator/identity_old"] = identity_weight * losses.l1(to_old_output[num:], old)
        metrics["generator/identity_young"] = identity_weight * losses.l1(
            to_young_output[num:], young
        )
    total = sum(metrics.values())
    metrics["generator/total"] = total
    return total, (metrics, fake_old, fake_young)


def discriminator_losses(discriminator_params, real, fake, *, discriminator):
    """Discriminator objective; each network scores its real and fake images in one call."""
    metrics = {}
    for domain in DOMAINS:
        num = real[domain].shape[0]
        images = jnp.concatenate([real[domain], jax.lax.stop_gradient(fake[domain])])
        scores = discriminator.apply(discriminator_params[domain], images)
        metrics[f"discriminator/{domain}"] = losses.discriminator_loss(scores[:num], scores[num:])
    total = sum(metrics.values())
    metrics["discriminator/total"] = total
    return total, metrics


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    networks: Networks,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    learning_rate_fn,
    axis_name: str = parallel.AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One CycleGAN update on this device's share of the batch (pmap semantics).

    `batch`: {'young': [b, H, W, 3], 'old': [b, H, W, 3]} in [-1, 1]. Generators
    are updated first with the discriminators fixed, then the discriminators on
    the generators' fakes drawn through this device's image pools. Gradients
    and metrics are averaged over `axis_name`.
    """
    young, old = batch["young"], batch["old"]

    # Parameters arrive replicated (unvarying over the axis). Differentiating
    # with respect to an unvarying value would sum the gradient over devices;
    # marking them varying gives per-device gradients, averaged explicitly below.
    generator_params, discriminator_params = jax.lax.pcast(
        (state.generator_params, state.discriminator_params), axis_name, to="varying"
    )

    (_, (generator_metrics, fake_old, fake_young)), generator_grads = jax.value_and_grad(
        generator_losses, has_aux=True
    )(
        generator_params,
        discriminator_params,
        young,
        old,
        networks=networks,
        config=config,
    )
    generator_grads = jax.lax.pmean(generator_grads, axis_name)
    updates, generator_opt_state = optimizer.update(
        generator_grads, state.generator_opt_state, state.generator_params
    )
    new_generator_params = optax.apply_updates(state.generator_params, updates)

    rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    device_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
    pool_keys = dict(zip(DOMAINS, jax.random.split(device_key), strict=True))
    fakes = {"young": fake_young, "old": fake_old}
    pools = {}
    for domain, pool in state.pools.items():
        pools[domain], fakes[domain] = image_pool.query(pool, fakes[domain], pool_keys[domain])

    (_, discriminator_metrics), discriminator_grads = jax.value_and_grad(
        discriminator_losses, has_aux=True
    )(
        discriminator_params,
        {"young": young, "old": old},
        fakes,
        discriminator=networks.discriminator,
    )
    discriminator_grads = jax.lax.pmean(discriminator_grads, axis_name)
    updates, discriminator_opt_state = optimizer.update(
        discriminator_grads, state.discriminator_opt_state, state.discriminator_params
    )
    new_discriminator_params = optax.apply_updates(state.discriminator_params, updates)

    metrics = jax.lax.pmean({**generator_metrics, **discriminator_metrics}, axis_name)
    losses_finite = jnp.all(jnp.array([jnp.isfinite(v) for v in metrics.values()]))
    metrics["nonfinite_loss"] = (~losses_finite).astype(jnp.float32)
    metrics["learning_rate"] = learning_rate_fn(state.step)

    new_state = state.replace(
        step=state.step + 1,
        generator_params=new_generator_params,
        discriminator_params=new_discriminator_params,
        generator_opt_state=generator_opt_state,
        discriminator_opt_state=discriminator_opt_state,
        pools=pools,
        rng=jax.random.key_data(rng),
    )
    return new_state, metrics


class StepFunctions(NamedTuple):
    """What the loop needs to run steps: the compiled init and step, and the state's shape."""

    init: Any  # rng -> state, with the state's shardings.
    step: Any  # (state, global batch) -> (state, metrics); the state is donated.
    abstract_state: Any  # ShapeDtypeStructs with the shardings, for a restore.


def create_step_functions(
    config: ml_collections.ConfigDict,
    mesh,
    schedule: Schedule,
    *,
    optimizer: optax.GradientTransformation | None = None,
    networks: Networks | None = None,
) -> StepFunctions:
    """Compiled `init(rng) -> state` and `step(state, batch) -> (state, metrics)` over `mesh`.

    `optimizer` (default: `create_optimizer`) and `networks` (default:
    `create_networks(config)`) replace the config's, for tests and benchmarks.
    """
    learning_rate_fn = create_learning_rate_fn(config, schedule)
    optimizer = optimizer or create_optimizer(config, learning_rate_fn)
    networks = networks or create_networks(config)
    init = functools.partial(
        create_train_state,
        config,
        networks=networks,
        optimizer=optimizer,
        num_devices=mesh.devices.size,
    )
    abstract_state = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.state_shardings(mesh, abstract_state)
    abstract_state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )
    per_device_step = functools.partial(
        train_step,
        networks=networks,
        optimizer=optimizer,
        config=config,
        learning_rate_fn=learning_rate_fn,
    )
    return StepFunctions(
        init=jax.jit(init, out_shardings=shardings),
        step=parallel.launch(
            per_device_step,
            mesh,
            abstract_state,
            config.parallelism,
            compiler_options=compiler_options(config),
        ),
        abstract_state=abstract_state,
    )
