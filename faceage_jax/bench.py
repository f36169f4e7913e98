"""Speed of the training step alone: random batches, no input pipeline.

Run, from the repository root:
  python -m faceage_jax.bench step --config configs/demo.py [--steps 10 --warmup 2]
  python -m faceage_jax.bench gpu [--batch_sizes=1,8,32,64 --dtypes=float32,bfloat16]
  python -m faceage_jax.bench photo [--config configs/<name>.py --steps 10]
  python -m faceage_jax.bench serve [--config configs/<name>.py --steps 20]

`step` prints the CPU's model and the ISA extensions that matter for it (AVX-512,
AVX-512 BF16, AMX), images/s (a young+old pair counts as one image: images/s is
the global batch over the seconds per step, as PyTorch's CycleGAN counts them),
the median step time, compile time, the model FLOPs (see `model_flops`) and
GFLOP/s, the executed FLOPs (see `executed_flops`: Winograd's are fewer) and
GFLOP/s, the share of a matmul peak that it measures itself on the same threads
in the compute dtype (--matmul_size, 2048 on CPU), page faults per step (see
`runtime`), peak RSS, the devices and the glibc tunables it ran with.
`gpu` is the prepared accelerator
table: the default config (or --config) at several batch sizes in float32 and
bfloat16, with the model FLOP utilization against matrix-multiply peaks it
measures itself. `photo` is the photo tool's speed per photo and stage
(`photo_bench`; default config unless --config, --steps photos per size);
`serve` the page's server's requests/s and latency at concurrency 1 and 4
(--steps requests per row).

`step` and `gpu` need only jax, flax, optax, absl and ml_collections (no TensorFlow), so it
runs on machines that carry just the accelerator stack.
"""

import dataclasses
import os
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from faceage_jax import config_validation, cyclegan, defaults, parallel, runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Configuration file (`gpu` defaults to faceage_jax/defaults.py).",
    lock_config=True,
)
flags.DEFINE_integer("steps", 5, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64"], "`gpu`: global batch sizes to time.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "`gpu`: compute dtypes to time.")
flags.DEFINE_integer(
    "matmul_size",
    None,
    "n of the n x n x n matmul that sets the peak (default 8192 on accelerators, 2048 on CPU).",
)

COMMANDS = ("step", "gpu", "photo", "serve")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one configuration's step costs; FLOPs are the model's, over all devices."""

    batch_size: int
    seconds_per_step: float
    cpu_seconds_per_step: float  # This process's CPU time: below cores x wall, others took some.
    page_faults_per_step: int  # Minor faults: fresh memory touched (see `runtime`).
    compile_seconds: float
    flops_per_step: float
    peak_rss_bytes: int
    device_kind: str
    num_devices: int
    executed_flops_per_step: float = float("nan")  # The program as run (Winograd: fewer).
    matmul_peak_flops: float = float("nan")  # One device's, measured in this process.

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.seconds_per_step

    @property
    def gflop_per_image(self) -> float:
        return self.flops_per_step / self.batch_size / 1e9

    @property
    def gflops_per_second(self) -> float:
        return self.flops_per_step / self.seconds_per_step / 1e9

    @property
    def executed_gflops_per_second(self) -> float:
        return self.executed_flops_per_step / self.seconds_per_step / 1e9

    @property
    def executed_share_of_peak(self) -> float:
        """Executed FLOP/s per device over the measured matmul peak of one device."""
        per_device = self.executed_flops_per_step / self.num_devices / self.seconds_per_step
        return per_device / self.matmul_peak_flops


def random_batch(config: ml_collections.ConfigDict, mesh, seed: int = 0) -> dict[str, jax.Array]:
    """A global batch of uniform [-1, 1] young and old images, sharded on 'data'."""
    rng = np.random.default_rng(seed)
    shape = (config.batch_size, config.image_size, config.image_size, 3)
    host_batch = {
        domain: rng.uniform(-1, 1, shape).astype(np.float32) for domain in cyclegan.DOMAINS
    }
    return parallel.global_batch(mesh, host_batch)


def xla_flops(stage) -> float:
    """FLOPs of one run on one device from XLA's cost analysis of a lowered or compiled step."""
    analysis = stage.cost_analysis()
    # Older jaxlibs return one dict per device program.
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One configuration's step, compiled over all devices, with its random batch."""

    config: ml_collections.ConfigDict
    functions: cyclegan.StepFunctions
    executable: Any
    batch: dict[str, jax.Array]
    compile_seconds: float
    flops_per_step: float
    executed_flops_per_step: float


def lower_step(config: ml_collections.ConfigDict, mesh) -> tuple:
    """(config, step functions, random batch, lowered step): the tracing half of compiling."""
    if config.parallelism != "shard_map":
        raise app.UsageError(
            f"the benchmark times the jitted shard_map step; got config.parallelism="
            f"{config.parallelism!r}. Drop --config.parallelism or set it to 'shard_map'."
        )
    config_validation.validate(config, num_devices=mesh.devices.size)
    functions = cyclegan.create_step_functions(config, mesh, cyclegan.create_schedule(config, 1))
    batch = random_batch(config, mesh, config.seed)
    return config, functions, batch, functions.step.lower(functions.abstract_state, batch)


def compile_step(lowered_step: tuple, num_devices: int) -> CompiledStep:
    """XLA compilation of a lowered step, timed, with its model FLOPs over all devices."""
    config, functions, batch, lowered = lowered_step
    start = time.perf_counter()
    executable = lowered.compile()
    compile_seconds = time.perf_counter() - start
    flops = model_flops(config, batch) * num_devices
    executed = executed_flops(config, batch) * num_devices
    return CompiledStep(config, functions, executable, batch, compile_seconds, flops, executed)


def _counted_flops(config: ml_collections.ConfigDict, batch, residual_convs: str) -> float:
    """XLA's FLOPs of the step as written, per device, with every residual block unrolled."""
    config = config.copy_and_resolve_references()
    config.residual_convs = residual_convs
    generator, discriminator = cyclegan.create_networks(config)
    networks = cyclegan.Networks(generator.clone(scan_blocks=False), discriminator)
    schedule = cyclegan.create_schedule(config, 1)
    functions = cyclegan.create_step_functions(
        config, parallel.create_mesh(), schedule, networks=networks
    )
    return xla_flops(functions.step.lower(functions.abstract_state, batch))


def model_flops(config: ml_collections.ConfigDict, batch) -> float:
    """The FLOPs of one step of the straightforward networks, per device.

    Counted by XLA on the step as written, before optimization: direct
    convolutions and the residual blocks as a loop. That is the figure a
    PyTorch FLOP counter gives for the same step (README, "Benchmarks").
    The step that runs is not counted: Winograd convolutions do the same work
    in fewer FLOPs, XLA counts a scan's body once, and after optimization GPUs
    hide convolutions in cuDNN calls that XLA does not count.
    """
    return _counted_flops(config, batch, "direct")


def executed_flops(config: ml_collections.ConfigDict, batch) -> float:
    """The FLOPs of one step as it runs here, per device: `model_flops` with the config's
    residual convolutions (Winograd's transforms and products where they run).

    Still counted on the program as written, every residual block unrolled: the
    FLOPs that XLA's fusions and a GPU's convolution library do are not visible.
    """
    algorithm = "winograd" if cyclegan.use_winograd(config) else "direct"
    return _counted_flops(config, batch, algorithm)


def time_step(step: CompiledStep, state, *, steps: int, warmup: int) -> StepReport:
    """Runs `warmup` then `steps` steps from `state` (donated); the median step time."""
    if steps < 1 or warmup < 0:
        raise app.UsageError(f"need --steps >= 1 and --warmup >= 0, got {steps} and {warmup}.")
    times, cpu_times, faults = [], [], []
    for i in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state, metrics = step.executable(state, step.batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start)
    if float(metrics["nonfinite_loss"]):
        raise RuntimeError("the benchmarked step produced a non-finite loss")
    return StepReport(
        batch_size=step.config.batch_size,
        seconds_per_step=statistics.median(times),
        cpu_seconds_per_step=statistics.median(cpu_times),
        page_faults_per_step=round(statistics.median(faults)),
        compile_seconds=step.compile_seconds,
        flops_per_step=step.flops_per_step,
        peak_rss_bytes=peak_rss_bytes(),
        device_kind=jax.devices()[0].device_kind,
        num_devices=jax.device_count(),
        executed_flops_per_step=step.executed_flops_per_step,
    )


def measure_step(
    config: ml_collections.ConfigDict, *, steps: int, warmup: int, matmul_size: int = 2048
) -> StepReport:
    """Compiles the training step over all devices and times it on random batches.

    Also measures one device's matmul peak in the compute dtype, on the threads
    the step runs on, after the step (so the step's timing sees a cold cache no
    more than training does).
    """
    mesh = parallel.create_mesh()
    step = compile_step(lower_step(config, mesh), mesh.devices.size)
    state = step.functions.init(jax.random.key(config.seed))
    jax.block_until_ready(state)
    runtime.release_freed_memory()  # As training does: the compilers' memory goes back.
    report = time_step(step, state, steps=steps, warmup=warmup)
    peak = measure_matmul_peak(matmul_size, jnp.dtype(config.compute_dtype))
    return dataclasses.replace(report, matmul_peak_flops=peak)


def describe_config(config: ml_collections.ConfigDict) -> str:
    return (
        f"{config.image_size}px, ngf {config.ngf}, ndf {config.ndf}, "
        f"{config.n_res_blocks} blocks, global batch {config.batch_size}, {config.compute_dtype}"
    )


def format_step_report(report: StepReport) -> str:
    return "\n".join(
        [
            f"devices: {report.num_devices} x {report.device_kind}",
            f"images/s: {report.images_per_second:.3f}",
            f"seconds/step: {report.seconds_per_step:.4f} (median)",
            f"process CPU seconds/step: {report.cpu_seconds_per_step:.4f} (median)",
            f"page faults/step: {report.page_faults_per_step} (median)",
            f"compile seconds: {report.compile_seconds:.1f}",
            f"model FLOPs/step: {report.flops_per_step:.4g}",
            f"GFLOP/image: {report.gflop_per_image:.1f}",
            f"model GFLOP/s: {report.gflops_per_second:.1f}",
            f"executed FLOPs/step: {report.executed_flops_per_step:.4g}",
            f"executed GFLOP/s: {report.executed_gflops_per_second:.1f}",
            f"matmul peak GFLOP/s: {report.matmul_peak_flops / 1e9:.1f} (one device)",
            f"executed share of matmul peak: {report.executed_share_of_peak:.1%}",
            f"peak RSS: {report.peak_rss_bytes / GIB:.2f} GiB",
        ]
    )


def measure_matmul_peak(size: int, dtype, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix multiply at the default precision, after warmup."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(key, (size, size), dtype) for key in keys)
    matmul = jax.jit(jnp.matmul)
    for _ in range(3):
        matmul(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a, b)
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * size**3 / seconds


def row_configs(config, batch_sizes, dtypes) -> list[ml_collections.ConfigDict]:
    """One config per table row; both dtypes of a batch size come before the next size."""
    rows = []
    for batch_size in batch_sizes:
        for dtype in dtypes:
            row = ml_collections.ConfigDict(config.to_dict())
            row.batch_size, row.compute_dtype = batch_size, dtype
            rows.append(row)
    return rows


def gpu_table(
    config: ml_collections.ConfigDict,
    batch_sizes: list[int],
    dtypes: list[str],
    *,
    steps: int,
    warmup: int,
    matmul_size: int,
) -> list[str]:
    """The accelerator table, printed line by line as each row finishes.

    Rows start from one initial state (it depends on neither the batch size nor
    the compute dtype). Each row's compilation, with convolution autotuning,
    takes most of the table's time.
    """
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    emit(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    emit(f"config: {describe_config(config)} (batch and dtype per row)")
    peaks = {dtype: measure_matmul_peak(matmul_size, jnp.dtype(dtype)) for dtype in dtypes}
    for dtype, peak in peaks.items():
        emit(f"matmul peak {dtype} ({matmul_size}^3, default precision): {peak / 1e12:.3g} TFLOP/s")
    emit(
        f"{'dtype':>9} {'batch':>5} {'images/s':>10} {'s/step':>9} {'compile s':>9} "
        f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6}"
    )
    mesh = parallel.create_mesh()
    initial_state = None
    for row in row_configs(config, batch_sizes, dtypes):
        dtype, batch_size = row.compute_dtype, row.batch_size
        try:
            step = compile_step(lower_step(row, mesh), mesh.devices.size)
            if initial_state is None:
                initial_state = step.functions.init(jax.random.key(config.seed))
            state = jax.tree.map(jnp.copy, initial_state)  # Each row donates its own copy.
            report = time_step(step, state, steps=steps, warmup=warmup)
        except Exception as error:  # A failed row (e.g. out of memory) must not end the table.
            emit(f"{dtype:>9} {batch_size:>5} failed: {type(error).__name__}: {error}")
            continue
        achieved = report.flops_per_step / report.seconds_per_step
        emit(
            f"{dtype:>9} {batch_size:>5} {report.images_per_second:>10.2f} "
            f"{report.seconds_per_step:>9.4f} {report.compile_seconds:>9.1f} "
            f"{report.gflop_per_image:>9.1f} {achieved / 1e12:>8.3g} "
            f"{achieved / peaks[dtype]:>6.1%}"
        )
    emit(f"peak RSS: {peak_rss_bytes() / GIB:.2f} GiB")
    return lines


def main(argv):
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise app.UsageError(f"give one command, one of {COMMANDS}; got {commands}.")
    config = FLAGS.config
    if commands[0] == "step":
        if config is None:
            raise app.UsageError("`step` needs --config=configs/<name>.py.")
        runtime.choose_xla_cpu_scheduler(config)  # As training does.
        print(f"cpu: {runtime.cpu_info().describe()}", flush=True)
        print(f"config: {describe_config(config)}", flush=True)
        print(f"glibc tunables: {os.environ.get('GLIBC_TUNABLES') or '(none)'}", flush=True)
        size = FLAGS.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
        report = measure_step(config, steps=FLAGS.steps, warmup=FLAGS.warmup, matmul_size=size)
        print(format_step_report(report))
        print(f"(matmul peak: {size}^3 {config.compute_dtype}, default precision)")
    elif commands[0] in ("photo", "serve"):
        from faceage_jax import photo_bench

        measure = photo_bench.run if commands[0] == "photo" else photo_bench.serve
        measure(defaults.get_config() if config is None else config, FLAGS.steps)
    else:
        gpu_table(
            defaults.get_config() if config is None else config,
            [int(size) for size in FLAGS.batch_sizes],
            FLAGS.dtypes,
            steps=FLAGS.steps,
            warmup=FLAGS.warmup,
            matmul_size=FLAGS.matmul_size or 8192,
        )


if __name__ == "__main__":
    runtime.reexec_with_huge_pages()  # Before flags are read; does not return if it restarts.
    app.run(main)
