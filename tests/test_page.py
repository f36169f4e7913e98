"""The page in a real headless browser: Playwright for Python driving Debian's chromium.

The server runs as `python -m faceage_jax.serve` in a subprocess, with an exported
model: the test config's generators with random weights, or the file named by
FACEAGE_PAGE_MODEL (the README's screenshot is this test's, run with the demo's
`workdir/demo/generators.faceage`). Screenshots are kept in test-artifacts/.

Without chromium the test is skipped, except where FACEAGE_REQUIRE_BROWSER is set
(`.ci/run` sets it, after installing chromium): there it fails.
"""

import base64
import http.client
import io
import json
import os
import shutil
import time
import urllib.request

import numpy as np
import pytest
import skimage.data
from PIL import Image

from faceage_jax import cyclegan, export
from tests import helpers

ARTIFACTS = helpers.REPO_ROOT / "test-artifacts"
BROWSER_ARGS = [
    # As root in a container, and on a machine whose network is closed: no sandbox,
    # no GPU, none of chromium's own background connections.
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    path = os.environ.get("FACEAGE_CHROMIUM") or shutil.which("chromium")
    if path:
        return path
    message = "no chromium: apt-get install -y --no-install-recommends chromium"
    if os.environ.get("FACEAGE_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = os.environ.get("FACEAGE_PAGE_MODEL")
    if not model:
        config = helpers.make_config()
        model = tmp_path_factory.mktemp("page") / "random.faceage"
        export.save(model, config, cyclegan.init_generator_params(config), 0, helpers.TEMPLATE)
    port = helpers.free_port()
    process = helpers.start_python(
        "-m", "faceage_jax.serve", "--exported", model, "--port", port, "--max-upload-mb", 5
    )
    origin = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{origin}/healthz", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{process.stdout.read()}")
        time.sleep(0.5)
    yield origin
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(server + "/")
    yield page
    page.close()


READ_IMAGE = """image => {
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  canvas.getContext("2d").drawImage(image, 0, 0);
  return canvas.toDataURL("image/png");
}"""


def near_the_face(box, shape) -> np.ndarray:
    """The face box grown by its width on each side and 1.5 widths above: where change may be."""
    left, top, right, bottom = box
    width = right - left
    mask = np.zeros(shape[:2], bool)
    mask[
        max(0, int(top - 1.5 * width)) : int(bottom + width),
        max(0, int(left - width)) : int(right + width),
    ] = True
    return mask


@pytest.mark.slow
def test_a_photo_is_aged_in_the_browser_and_only_near_the_face(page, server, tmp_path):
    from playwright.sync_api import expect

    astronaut = skimage.data.astronaut()
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    expect(page.locator("#model")).to_contain_text("checkpoint step")
    with page.expect_response("**/api/age") as first:
        page.set_input_files("#file", path)
    assert first.value.status == 200
    expect(page.locator("#status")).to_contain_text("Done: strength 100 %", timeout=60_000)
    # Move the strength slider: the page asks again and shows the new result.
    with page.expect_response("**/api/age") as second:
        page.locator("#strength").fill("50")
    expect(page.locator("#status")).to_contain_text("Done: strength 50 %", timeout=60_000)
    response = second.value
    assert response.status == 200 and response.headers["content-type"] == "image/png"
    # The result as the page shows it, read back through a canvas (lossless).
    data_url = page.locator("#result").evaluate(READ_IMAGE)
    assert data_url.startswith("data:image/png;base64,")
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))
    result = result[..., :3]
    assert result.shape == astronaut.shape
    box = json.loads(response.headers["x-face-box"])
    changed = (result != astronaut).any(-1)
    near = near_the_face(box, astronaut.shape)
    assert changed[near].mean() > 0.2
    assert not changed[~near].any()
    assert page.locator("#download").get_attribute("download") == "astronaut-aged.png"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "page.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # A phone's screen.
    page.screenshot(path=ARTIFACTS / "page-phone.png", full_page=True)
    # Nothing was asked of any host but the server (and the page's own blob: URLs).
    assert page.requests
    for url in page.requests:
        assert url.startswith((server + "/", f"blob:{server}/")), url


@pytest.mark.slow
def test_a_text_file_and_a_photo_without_a_face_show_their_messages(page, tmp_path):
    from playwright.sync_api import expect

    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo\n")
    page.set_input_files("#file", notes)
    expect(page.locator("#error")).to_contain_text("is not an image", timeout=60_000)
    expect(page.locator("#results")).to_be_hidden()
    wall = tmp_path / "wall.png"
    Image.new("RGB", (300, 200), (120, 130, 140)).save(wall)
    page.set_input_files("#file", wall)
    expect(page.locator("#error")).to_contain_text("no face found", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "page-error.png")


@pytest.mark.slow
def test_no_request_can_read_a_file_of_the_server(server):
    # Raw paths, as a client that does not normalize them sends them.
    host, port = server.removeprefix("http://").split(":")
    for path in (
        "/../../etc/passwd",
        "/..%2f..%2fetc%2fpasswd",
        "/%2e%2e/serve.py",
        "/web/../serve.py",
        "//etc/passwd",
        "/app.js/../../serve.py",
    ):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status in (400, 404), (path, response.status)
        assert b"root:" not in body and b"import" not in body, path
