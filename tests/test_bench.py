"""The step benchmark: its figures, and the command lines that print them."""

import re

import pytest

from faceage_jax import bench, cyclegan, parallel, runtime
from tests.helpers import make_config, run_python


def run_bench(*args: str) -> str:
    """Runs `python -m faceage_jax.bench ARGS` from the repository root; returns its stdout."""
    unset = {"GLIBC_TUNABLES": None, runtime.RESTARTED: None}
    result = run_python("-m", "faceage_jax.bench", *args, env=unset, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def figure(output: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}: ([0-9.e+]+)", output, re.MULTILINE)
    assert match, f"no '{name}:' line in:\n{output}"
    return float(match.group(1))


def test_a_young_and_old_pair_counts_as_one_image():
    report = bench.StepReport(
        batch_size=4,
        seconds_per_step=2.0,
        cpu_seconds_per_step=3.9,
        page_faults_per_step=500,
        compile_seconds=10.0,
        flops_per_step=8e10,
        peak_rss_bytes=2**30,
        device_kind="cpu",
        num_devices=1,
    )
    assert report.images_per_second == 2.0
    assert report.gflop_per_image == 20.0
    assert report.gflops_per_second == 40.0


@pytest.mark.slow
def test_step_command_prints_every_figure():
    output = run_bench("step", "--config", "configs/test.py", "--steps", "2", "--warmup", "0")

    assert "devices: 1 x cpu" in output
    seconds = figure(output, "seconds/step")
    assert seconds > 0
    # The test config's global batch is 4.
    assert abs(figure(output, "images/s") - 4 / seconds) < 0.01 * 4 / seconds
    assert figure(output, "process CPU seconds/step") > 0
    assert figure(output, "page faults/step") >= 0
    # The benchmark restarts itself with huge pages where that helps, as training does.
    helps = runtime.wants_reexec(
        {}, runtime.glibc_version(), runtime.transparent_huge_pages_available()
    )
    tunables = "glibc.malloc.hugetlb=1" if helps else "(none)"
    assert f"glibc tunables: {tunables}" in output
    assert figure(output, "compile seconds") > 0
    flops = figure(output, "model FLOPs/step")
    # 32px, ngf/ndf 8: well under a GFLOP per image, but not nothing.
    assert 0.05 < flops / 4 / 1e9 < 1
    assert figure(output, "peak RSS") > 0.1
    # The CPU it ran on, and the step as executed beside the model's figures: on CPU in
    # float32 the residual convolutions run by Winograd, in fewer FLOPs than the model's.
    cpu = runtime.cpu_info()
    assert f"cpu: {cpu.model} ({cpu.cores} cores); ISA: " in output
    executed = figure(output, "executed FLOPs/step")
    assert 0.5 * flops < executed < flops
    assert figure(output, "executed GFLOP/s") == pytest.approx(
        executed / seconds / 1e9, rel=0.01, abs=0.1
    )
    peak = figure(output, "matmul peak GFLOP/s")
    assert peak > 1
    share = figure(output, "executed share of matmul peak") / 100
    assert share == pytest.approx(executed / seconds / 1e9 / peak, rel=0.05, abs=0.002)
    assert "(matmul peak: 2048^3 float32, default precision)" in output


SAPPHIRE_RAPIDS = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags		: fpu sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags		: fpu sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""


def test_the_cpu_line_names_the_model_and_the_isa_extensions_that_matter():
    xeon = runtime.cpu_info(SAPPHIRE_RAPIDS)
    assert xeon.model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert xeon.describe().endswith("; ISA: avx2 avx512f avx512_bf16 avx512_fp16 amx_tile amx_bf16")
    epyc = runtime.cpu_info("model name\t: AMD EPYC\nflags\t: fpu avx2 avx512f avx512_bf16\n")
    assert epyc.describe().endswith(
        "; ISA: avx2 avx512f avx512_bf16; lacks avx512_fp16 amx_tile amx_bf16"
    )
    assert runtime.cpu_info("").model  # Without /proc/cpuinfo: platform's name, never empty.


@pytest.mark.slow
def test_model_flops_are_those_of_the_straightforward_step():
    config = make_config()
    mesh = parallel.create_mesh()
    model, executed = {}, {}
    for algorithm in ("winograd", "direct"):
        config.residual_convs = algorithm
        _, _, batch, lowered = bench.lower_step(config, mesh)
        model[algorithm] = bench.model_flops(config, batch)
        executed[algorithm] = bench.xla_flops(lowered)
    # Winograd does the residual convolutions' work in fewer FLOPs; the benchmark
    # still counts the model's, which is what the direct step executes.
    assert model["winograd"] == model["direct"] == pytest.approx(executed["direct"], rel=1e-4)
    assert executed["winograd"] < 0.9 * executed["direct"]


@pytest.mark.slow
def test_model_flops_count_every_residual_block(monkeypatch):
    # Direct convolutions run their blocks as a scan off CPU, and XLA's cost
    # analysis counts a scan's body once: count a scanning step here.
    create_networks = cyclegan.create_networks

    def scanning_networks(config):
        generator, discriminator = create_networks(config)
        return cyclegan.Networks(generator.clone(scan_blocks=True), discriminator)

    monkeypatch.setattr(cyclegan, "create_networks", scanning_networks)
    config = make_config()
    batch = bench.random_batch(config, parallel.create_mesh())
    flops = []
    for blocks in (1, 2, 3):
        config.n_res_blocks = blocks
        flops.append(bench.model_flops(config, batch))
    assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0], rel=1e-4)
    assert flops[1] - flops[0] > 0.1 * flops[0]


@pytest.mark.slow
def test_gpu_command_prints_a_row_per_batch_and_dtype():
    output = run_bench(
        "gpu",
        "--config",
        "configs/test.py",
        "--batch_sizes=4",
        "--dtypes=float32",
        "--matmul_size=256",
        "--steps",
        "1",
        "--warmup",
        "0",
    )
    assert re.search(r"^matmul peak float32 \(256\^3\b.*: [0-9.]+ TFLOP/s$", output, re.MULTILINE)
    rows = re.findall(r"^\s*float32\s+4\s+([0-9.]+)\s", output, re.MULTILINE)
    assert len(rows) == 1 and float(rows[0]) > 0, output


def test_the_benchmark_needs_neither_tensorflow_nor_clu():
    # Accelerator machines may carry only jax, flax, optax and ml_collections.
    probe = (
        "import sys, faceage_jax.bench; "
        "print(sorted(m for m in ('tensorflow', 'clu') if m in sys.modules))"
    )
    result = run_python("-c", probe, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_the_photo_benchmark_prints_every_stage_for_both_photo_sizes():
    output = run_bench("photo", "--config", "configs/test.py", "--steps", "1")
    assert re.search(r"^model load: [0-9.]+ s to read 32px generators", output, re.MULTILINE)
    for photo in ("12 MP", "1 MP"):
        for stage in ("decode", "detect_align", "generator", "paste_back", "encode"):
            assert re.search(rf"^\| {photo} \| {stage} \| [0-9.]+ \| [0-9.]+ \|$", output, re.M)
        total = re.search(rf"^\| {photo} \| \*\*total\*\* \| \*\*([0-9.]+)\*\*", output, re.M)
        assert total and float(total.group(1)) > 0, output


@pytest.mark.slow
def test_the_serve_benchmark_prints_a_row_per_concurrency():
    output = run_bench("serve", "--config", "configs/test.py", "--steps", "4")
    for concurrency in (1, 4):
        row = re.search(
            rf"^\| {concurrency} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", output, re.M
        )
        assert row, output
        assert all(float(value) > 0 for value in row.groups())
