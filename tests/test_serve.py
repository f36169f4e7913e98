"""The page's server: its API on every kind of bad input, under concurrency, and its memory.

The app runs in this process (httpx's ASGI transport) with the test config's
generators with random weights; the browser tests are in test_page.py.
"""

import asyncio
import io

import httpx
import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from faceage_jax import serve
from tests import helpers


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


ASTRONAUT = png(skimage.data.astronaut())


@pytest.fixture(scope="module")
def service():
    return serve.AgingService(helpers.random_generators())


def post(app, files=None, data=None, content=None, headers=None):
    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(
                "/api/age", files=files, data=data, content=content, headers=headers
            )

    return asyncio.run(send())


def get(app, path):
    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    return asyncio.run(send())


async def _put(app, path):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.put(path)


def photo(data=ASTRONAUT, name="astronaut.png", **fields):
    return {"files": {"photo": (name, data, "application/octet-stream")}, "data": fields}


def test_a_photo_comes_back_aged_at_its_size_with_the_face_box(service):
    app = serve.create_app(service)
    response = post(app, **photo(strength="0.7", format="png"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    aged = np.asarray(Image.open(io.BytesIO(response.content)))
    assert aged.shape == (512, 512, 3)
    assert (aged != skimage.data.astronaut()).any()
    left, top, right, bottom = __import__("json").loads(response.headers["x-face-box"])
    assert 170 < left < 190 and 75 < top < 95 and 255 < right < 280 and 160 < bottom < 180
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    jpeg = post(app, **photo())
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 3]


def damaged_exif_jpeg() -> bytes:
    from tests.test_age_photo import DAMAGED_EXIF

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "JPEG", exif=DAMAGED_EXIF)
    return buffer.getvalue()


BAD_UPLOADS = {
    "text": (photo(b"just some notes\n", "notes.png"), 415, "is not an image"),
    "truncated": (photo(truncated_jpeg(), "cut.jpg"), 422, "truncated or corrupt"),
    "no face": (
        photo(png(np.full((200, 300, 3), 128, np.uint8)), "wall.png"),
        422,
        "no face found",
    ),
    "tiny face": (
        photo(png(np.asarray(Image.fromarray(skimage.data.astronaut()).resize((300, 300))))),
        422,
        "faces of at least 64 px",
    ),
    "no photo": ({"files": {"strength": (None, b"1")}}, 400, "No photo"),
    "empty photo": (photo(b""), 400, "No photo"),
    "bad strength": (photo(strength="1.5"), 400, "strength is a number from 0 to 1"),
    "strength not a number": (photo(strength="lots"), 400, "strength is a number"),
    "bad direction": (photo(direction="sideways"), 400, "direction is one of"),
    "bad format": (photo(format="gif"), 400, "format is one of jpeg, png"),
    "damaged exif": (photo(damaged_exif_jpeg(), "exif.jpg"), 422, "truncated or corrupt"),
    "not multipart": (
        {"content": ASTRONAUT, "headers": {"content-type": "image/png"}},
        400,
        "multipart/form-data",
    ),
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_each_bad_upload_gets_its_status_and_message_and_the_server_keeps_serving(service, case):
    app = serve.create_app(service)
    request, status, message = BAD_UPLOADS[case]
    response = post(app, **request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert post(app, **photo()).status_code == 200


def test_uploads_over_the_size_and_pixel_limits_are_refused():
    generators = helpers.random_generators()
    small = serve.create_app(serve.AgingService(generators, max_upload_mb=0.1))
    response = post(small, **photo(ASTRONAUT))  # ~0.45 MB.
    assert response.status_code == 413
    assert "over the limit of 0.1 MB" in response.json()["error"]
    few_pixels = serve.create_app(serve.AgingService(generators, max_megapixels=0.1))
    response = post(few_pixels, **photo())
    assert response.status_code == 413
    assert "512x512 = 0 megapixels, over the limit of 0.1" in response.json()["error"]


def count_compilations():
    """A list that grows by one for every program JAX lowers (cache hits included)."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


def test_twenty_concurrent_uploads_are_all_answered_correctly_without_recompiling():
    service = serve.AgingService(helpers.random_generators(seed=3), queue=32)
    app = serve.create_app(service)
    first = post(app, **photo(format="png"))
    assert first.status_code == 200
    compilations = count_compilations()

    async def many():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *[client.post("/api/age", **photo(format="png")) for _ in range(20)]
            )

    responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * 20
    assert all(r.content == first.content for r in responses)
    assert compilations == []


def test_a_full_queue_answers_503_with_a_retry_hint():
    generators = helpers.random_generators()
    slow = {}
    for direction, function in generators._functions.items():

        def delayed(images, function=function):
            import time

            time.sleep(0.5)
            return function(images)

        slow[direction] = delayed
    generators._functions = slow
    app = serve.create_app(serve.AgingService(generators, queue=1))

    async def three():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(*[client.post("/api/age", **photo()) for _ in range(3)])

    statuses = sorted(r.status_code for r in asyncio.run(three()))
    assert statuses == [200, 503, 503]
    busy = [r for r in asyncio.run(three()) if r.status_code == 503][0]
    assert busy.headers["retry-after"] == "2" and "Busy" in busy.json()["error"]
    assert post(app, **photo()).status_code == 200


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


MEMORY_BOUND_BYTES = 40 * 2**20  # Growth allowed from request 10 to request 100.


def test_memory_after_100_requests_stays_near_memory_after_10(service):
    app = serve.create_app(service)
    for index in range(100):
        assert post(app, **photo(strength=str(index % 5 / 4))).status_code == 200
        if index == 9:
            after_10 = resident_bytes()
    growth = resident_bytes() - after_10
    print(f"RSS after 10 requests {after_10 / 2**20:.0f} MiB, growth to 100: {growth / 2**20:.1f}")
    assert growth < MEMORY_BOUND_BYTES


def test_only_the_pages_three_files_are_served(service):
    app = serve.create_app(service)
    assert get(app, "/healthz").json() == {"status": "ok"}
    info = get(app, "/api/info").json()
    assert info["image_size"] == 32 and info["step"] == 0
    for path, media in (
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ):
        response = get(app, path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(media)
    for path in (
        "/serve.py",
        "/web/index.html",
        "/..%2fserve.py",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/api/age",
        "/index.html/../../serve.py",
    ):
        response = get(app, path)
        assert response.status_code in (404, 405), path
        assert "import" not in response.text and "root:" not in response.text


def test_multipart_parsing_keeps_fields_and_files_in_memory():
    boundary = "XyZ"
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="direction"\r\n\r\nold_to_young\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="photo"; filename="../../me.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n\x00\x01binary\r\n--XyZ--\r\n"
    )
    parts = serve.parse_multipart(body, f"multipart/form-data; boundary={boundary}")
    assert parts["direction"] == (None, b"old_to_young")
    assert parts["photo"] == ("../../me.jpg", b"\x00\x01binary")
