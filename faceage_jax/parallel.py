"""Data parallelism with pmap semantics over all devices of all hosts.

The training step is written per device (see `cyclegan.train_step`): it sees its
share of the batch, averages gradients and metrics with `lax.pmean` over the
axis 'data', and owns one image pool per domain. It is launched either with
`jax.jit(jax.shard_map(...))` over a 1-D mesh of every global device (the
default) or with `jax.pmap` of the same function (`config.parallelism='pmap'`).
Both take and return the same global state and batch arrays, so checkpoints
and the training loop do not depend on the launcher.

Layout of the global state: everything is replicated except the image pools,
whose leaves carry a leading device axis sharded over 'data'.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
PARALLELISMS = ("shard_map", "pmap")


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def state_specs(state):
    """PartitionSpecs of the global state: pools sharded on their device axis, rest replicated."""
    specs = jax.tree.map(lambda _: P(), state)
    return specs.replace(pools=jax.tree.map(lambda _: P(AXIS), state.pools))


def state_shardings(mesh: Mesh, state):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state))


def global_batch(mesh: Mesh, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local numpy arrays `[B_host, ...]` -> global arrays `[B_global, ...]` on 'data'."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(array))
        for name, array in host_batch.items()
    }


def _per_device_pools(fn: Callable) -> Callable:
    """Adapts `fn(state, batch)` that sees one pool to shard_map's view of `[1, ...]` pools."""

    def wrapped(state, batch):
        state = state.replace(pools=jax.tree.map(lambda x: x[0], state.pools))
        state, metrics = fn(state, batch)
        return state.replace(pools=jax.tree.map(lambda x: x[None], state.pools)), metrics

    return wrapped


def launch(
    per_device_step: Callable,
    mesh: Mesh,
    abstract_state,
    parallelism: str,
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable:
    """Compiles `per_device_step(state, batch) -> (state, metrics)` over all devices of `mesh`.

    The returned function takes the global state (donated) and a global batch
    sharded on 'data', and returns the new global state and replicated metrics.
    `compiler_options` (XLA's debug options by name) apply to the step's compilation.
    """
    if parallelism == "shard_map":
        specs = state_specs(abstract_state)
        step = jax.shard_map(
            _per_device_pools(per_device_step),
            mesh=mesh,
            in_specs=(specs, P(AXIS)),
            out_specs=(specs, P()),
        )
        return jax.jit(step, donate_argnums=0, compiler_options=compiler_options)
    if parallelism == "pmap":
        return _launch_pmap(per_device_step, mesh, abstract_state, compiler_options)
    raise ValueError(
        f"config.parallelism={parallelism!r} is not supported; use one of {PARALLELISMS}."
    )


def _launch_pmap(
    per_device_step: Callable, mesh: Mesh, abstract_state, compiler_options
) -> Callable:
    """`jax.pmap` of the same per-device step, wrapped to take and return global arrays.

    `jax.pmap` takes no compiler options, so the step is lowered and compiled with
    them on its first call (the state's and batch's shapes never change).
    """
    num_devices = mesh.devices.size
    # Replicated fields are broadcast (in/out axis None); pools are mapped on their device axis.
    axes = jax.tree.map(lambda _: None, abstract_state)
    axes = axes.replace(pools=jax.tree.map(lambda _: 0, abstract_state.pools))
    pmapped = jax.pmap(
        per_device_step,
        axis_name=AXIS,
        in_axes=(axes, 0),
        out_axes=(axes, None),
        devices=list(mesh.devices.flat),
        donate_argnums=0,
    )
    split_batch = jax.jit(
        lambda batch: jax.tree.map(
            lambda x: x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:]), batch
        )
    )

    compiled = []

    def step(state, batch):
        batch = split_batch(batch)
        if not compiled:
            compiled.append(pmapped.lower(state, batch).compile(compiler_options))
        return compiled[0](state, batch)

    return step
