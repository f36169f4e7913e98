"""Speed of the photo tool: `python -m faceage_jax.bench photo [--config C] [--steps N]`.

Prints the model's load time (reading an exported file, and its first call,
which compiles) and the face finder's, then p50 and p95 seconds per photo for a
12-megapixel (4000x3000) and a 1-megapixel (1155x866) JPEG, split into the
stages of `age_photo`: decode, detect_align, generator, paste_back, encode
(JPEG, quality 95). The photos are scikit-image's astronaut (public domain)
scaled up onto a plain background, the face ~70 % of the photo's height, with
Gaussian noise (sigma 4) as a camera's sensor adds: smooth upscaled pixels would
decode and encode several times faster than a real photo's.
The generators have random weights (speed does not depend on their values);
the face template is measured on synthetic faces as training measures it.
"""

import io
import pathlib
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from faceage_jax import age_photo, alignment, cyclegan, export, faces

PHOTOS = {"12 MP": (4000, 3000), "1 MP": (1155, 866)}
STAGES = ("decode", "detect_align", "generator", "paste_back", "encode")


def test_photo(width: int, height: int) -> bytes:
    """A JPEG of the astronaut's photo scaled to `height`, centred on a grey background."""
    import skimage.data

    face = Image.fromarray(skimage.data.astronaut()).resize((height, height), Image.BICUBIC)
    canvas = Image.new("RGB", (width, height), (96, 104, 112))
    canvas.paste(face, ((width - height) // 2, 0))
    noise = np.random.default_rng(0).normal(0, 4, (height, width, 3))
    noisy = np.clip(np.asarray(canvas) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def synthetic_template(finder, image_size: int) -> alignment.FaceTemplate:
    from input_pipeline import synthetic

    chips = np.stack(
        [faces.resize(synthetic.render_face(s), image_size) for s in synthetic.face_specs(100)]
    )
    _, _, landmarks = finder.locate(chips)
    return alignment.measure_template(landmarks, image_size, "100 synthetic faces")


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run(config, repeats: int) -> list[str]:
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    start = time.perf_counter()
    finder = faces.FaceFinder()
    emit(f"face finder load: {time.perf_counter() - start:.2f} s")
    size = config.image_size
    params = cyclegan.init_generator_params(config)
    template = synthetic_template(finder, size)
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "generators.faceage"
        export.save(path, config, params, 0, template)
        start = time.perf_counter()
        generators = export.load(path)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        generators(np.zeros((1, size, size, 3), np.uint8), "young_to_old")
        compiled = time.perf_counter() - start
    emit(
        f"model load: {loaded:.2f} s to read {config.image_size}px generators "
        f"(ngf {config.ngf}, {config.n_res_blocks} blocks), {compiled:.2f} s first call (compile)"
    )
    emit(f"repeats per photo size: {repeats} (after one untimed run)")
    emit("| photo | stage | p50 s | p95 s |")
    emit("| --- | --- | --- | --- |")
    for label, (width, height) in PHOTOS.items():
        data = test_photo(width, height)
        emit(f"({label}: {width}x{height}, JPEG of {len(data) / 1e6:.1f} MB)")
        runs = []
        for index in range(repeats + 1):
            timings = age_photo.Timings()
            with timings("decode"):
                photo = age_photo.read_photo(data, label)
            (aged,) = age_photo.age_photos([photo], generators, finder, timings=timings)
            if isinstance(aged, age_photo.PhotoError):
                raise RuntimeError(f"the benchmark photo was not aged: {aged}")
            with timings("encode"):
                age_photo.encode(aged, pathlib.Path("out.jpg"))
            if index:
                runs.append(dict(timings.seconds))
        totals = [sum(r.values()) for r in runs]
        for stage in STAGES:
            values = [r.get(stage, 0.0) for r in runs]
            emit(
                f"| {label} | {stage} | {statistics.median(values):.3f} | "
                f"{percentile(values, 95):.3f} |"
            )
        emit(
            f"| {label} | **total** | **{statistics.median(totals):.3f}** | "
            f"**{percentile(totals, 95):.3f}** |"
        )
    return lines


def _multipart(data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "faceage-bench-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="p.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


def serve(config, requests: int, concurrencies=(1, 4)) -> list[str]:
    """Requests/s and latency of `python -m faceage_jax.serve` for a 1 MP photo."""
    import concurrent.futures
    import socket
    import subprocess
    import sys
    import urllib.request

    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    width, height = PHOTOS["1 MP"]
    body, boundary = _multipart(test_photo(width, height), {"strength": "1", "format": "jpeg"})
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "generators.faceage"
        template = synthetic_template(faces.FaceFinder(), config.image_size)
        export.save(path, config, cyclegan.init_generator_params(config), 0, template)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "faceage_jax.serve",
            "--exported",
            str(path),
            "--port",
            str(port),
            "--queue",
            str(max(concurrencies) * 2),
        ]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        origin = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"{origin}/healthz", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.5)
            else:
                raise RuntimeError("the server did not start")

            def one() -> float:
                request = urllib.request.Request(
                    f"{origin}/api/age",
                    data=body,
                    method="POST",
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                )
                start = time.perf_counter()
                with urllib.request.urlopen(request, timeout=300) as response:
                    response.read()
                    if response.status != 200:
                        raise RuntimeError(f"status {response.status}")
                return time.perf_counter() - start

            for _ in range(2):
                one()  # Compiles, warms the caches.
            emit(
                f"serve: {width}x{height} JPEG, {config.image_size}px generators, "
                f"{requests} requests per row after 2 untimed"
            )
            emit("| concurrency | requests/s | p50 s | p95 s |")
            emit("| --- | --- | --- | --- |")
            for concurrency in concurrencies:
                start = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                    latencies = list(pool.map(lambda _: one(), range(requests)))
                wall = time.perf_counter() - start
                emit(
                    f"| {concurrency} | {requests / wall:.2f} | "
                    f"{statistics.median(latencies):.3f} | {percentile(latencies, 95):.3f} |"
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
    return lines
