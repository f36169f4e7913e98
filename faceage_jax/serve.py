"""A web page that ages a photo on this machine: `python -m faceage_jax.serve`.

    python -m faceage_jax.serve --exported workdir/demo/generators.faceage [--port 8000]
    python -m faceage_jax.serve --workdir DIR [--step N] [--host 127.0.0.1]

A Starlette app served by uvicorn: one page of plain HTML, JS and CSS shipped in
`faceage_jax/web/` (nothing from any other host), and its API:

    GET  /             the page (and /app.js, /style.css: those three files only)
    GET  /healthz      {"status": "ok"}
    GET  /api/info     the model: description, checkpoint step, image size, limits
    POST /api/age      multipart: `photo` (the file), `direction` (young_to_old or
                       old_to_young), `strength` (0-1), `format` (jpeg or png):
                       the whole photo aged (`age_photo`'s pipeline), or a JSON
                       {"error": ...} with a 4xx status

The model is loaded once. Photos are aged one at a time on one worker thread,
through `export.Generators` as the photo tool does (one compiled program per
direction at one face per photo); requests beyond `--queue` waiting get a 503
with Retry-After. An upload is read into memory (never written to disk, never
logged) up to `--max-upload-mb`; the multipart body is parsed in memory too.
"""

import argparse
import asyncio
import concurrent.futures
import importlib.resources
import json
import logging
import pathlib
import sys

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from faceage_jax import age_photo, export, faces

DEFAULT_MAX_UPLOAD_MB = 30.0
DEFAULT_QUEUE = 8  # Requests waiting or being aged; more get a 503.
RETRY_AFTER_SECONDS = 2
PAGE_FILES = {  # The only files the server sends: name -> media type.
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page may load and connect to nothing but this server (and show the blob: URLs
# of its own results).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STATUS = {  # What each photo error answers.
    age_photo.NotAnImageError: 415,
    age_photo.CorruptImageError: 422,
    age_photo.TooManyPixelsError: 413,
    age_photo.NoFaceError: 422,
}
FORMATS = {"jpeg": ("image/jpeg", ".jpg"), "png": ("image/png", ".png")}


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers={**SECURITY_HEADERS, **(headers or {})})


def parse_multipart(body: bytes, content_type: str, max_parts: int = 8) -> dict:
    """{field name: (filename or None, bytes)} of a multipart/form-data body, in memory."""
    media_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise RequestError(400, "Send the photo as multipart/form-data (a form with a file).")
    parts, current = {}, {}
    header = {"field": b"", "value": b""}

    def on_part_begin():
        current.clear()
        current.update(headers={}, data=[])

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        current["headers"][header["field"].lower()] = header["value"]
        header.update(field=b"", value=b"")

    def on_part_data(data, start, end):
        current["data"].append(data[start:end])

    def on_part_end():
        if len(parts) >= max_parts:
            raise RequestError(400, f"At most {max_parts} form fields.")
        _, disposition = parse_options_header(current["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        parts[name] = (
            None if filename is None else filename.decode("utf-8", "replace"),
            b"".join(current["data"]),
        )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as error:  # python-multipart's errors for a malformed body.
        raise RequestError(
            400, f"The form could not be read ({type(error).__name__}): send multipart/form-data."
        ) from None
    return parts


def _field(parts, name: str, default: str) -> str:
    if name not in parts:
        return default
    return parts[name][1].decode("utf-8", "replace").strip()


class AgingService:
    """The model, the face finder and the one worker thread that ages photos."""

    def __init__(
        self,
        generators,
        *,
        max_upload_mb=DEFAULT_MAX_UPLOAD_MB,
        queue=DEFAULT_QUEUE,
        max_megapixels=age_photo.DEFAULT_MAX_MEGAPIXELS,
    ):
        self.generators = generators
        self.finder = faces.FaceFinder()
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_upload_mb = max_upload_mb
        self.max_megapixels = max_megapixels
        self.queue = queue
        self.pending = 0  # Read and written on the event loop's thread only.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aging")

    def info(self) -> dict:
        return {
            "description": self.generators.description,
            "step": self.generators.step,
            "image_size": self.generators.image_size,
            "max_upload_mb": self.max_upload_mb,
            "max_megapixels": self.max_megapixels,
        }

    def age(self, data: bytes, name: str, direction: str, strength: float, image_format: str):
        """(encoded photo, face box) of one upload; runs on the worker thread."""
        photo = age_photo.read_photo(data, name, self.max_megapixels)
        (result,) = age_photo.age_photos(
            [photo], self.generators, self.finder, direction=direction, strength=strength
        )
        if isinstance(result, age_photo.PhotoError):
            raise result
        suffix = FORMATS[image_format][1]
        encoded = age_photo.encode(result, pathlib.Path(f"aged{suffix}"))
        return encoded, [round(float(v)) for v in result.faces[0].box]

    async def read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        too_large = RequestError(
            413, f"The upload is over the limit of {self.max_upload_mb:g} MB: send a smaller photo."
        )
        if declared is not None and declared.isdigit() and int(declared) > self.max_upload_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_upload_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle_age(self, request: Request) -> Response:
        if self.pending >= self.queue:
            return error_response(
                503,
                f"Busy: {self.pending} photos are being aged; try again in a few seconds.",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.pending += 1
        try:
            parts = parse_multipart(
                await self.read_body(request), request.headers.get("content-type", "")
            )
            if "photo" not in parts or not parts["photo"][1]:
                raise RequestError(400, "No photo: send the image file in the field 'photo'.")
            filename, data = parts["photo"]
            name = pathlib.PurePath(filename or "photo").name  # Only for messages.
            direction = _field(parts, "direction", "young_to_old")
            if direction not in export.DIRECTIONS:
                raise RequestError(400, f"direction is one of {', '.join(export.DIRECTIONS)}.")
            try:
                strength = float(_field(parts, "strength", "1"))
            except ValueError:
                strength = float("nan")
            if not 0 <= strength <= 1:
                raise RequestError(400, "strength is a number from 0 to 1.")
            image_format = _field(parts, "format", "jpeg").lower()
            if image_format not in FORMATS:
                raise RequestError(400, f"format is one of {', '.join(FORMATS)}.")
            loop = asyncio.get_running_loop()
            encoded, box = await loop.run_in_executor(
                self._worker, self.age, data, name, direction, strength, image_format
            )
        except RequestError as error:
            return error_response(error.status, str(error))
        except age_photo.PhotoError as error:
            return error_response(STATUS.get(type(error), 422), str(error))
        except Exception:  # A bug, not the upload: logged here, a JSON answer there.
            logging.exception("Aging an upload failed")
            return error_response(500, "The photo could not be aged (a server error, logged).")
        finally:
            self.pending -= 1
        headers = {
            **SECURITY_HEADERS,
            "X-Face-Box": json.dumps(box),
            "X-Model-Step": str(self.generators.step),
            "Cache-Control": "no-store",
        }
        return Response(encoded, media_type=FORMATS[image_format][0], headers=headers)


def create_app(service: AgingService) -> Starlette:
    web = importlib.resources.files("faceage_jax") / "web"
    pages = {name: (web / name).read_bytes() for name in PAGE_FILES}

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in pages:  # Never a path: only the three files above.
            return error_response(404, "Not found.")
        return Response(pages[name], media_type=PAGE_FILES[name], headers=SECURITY_HEADERS)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers=SECURITY_HEADERS)

    async def info(request: Request) -> Response:
        return JSONResponse(service.info(), headers=SECURITY_HEADERS)

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        return error_response(status, "Method not allowed." if status == 405 else "Not found.")

    routes = [
        Route("/", page),
        Route("/healthz", healthz),
        Route("/api/info", info),
        Route("/api/age", service.handle_age, methods=["POST"]),
        Route("/{name:str}", page),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


# ------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceage-serve", description="Serve a page that ages photos, on this machine."
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--exported", help="A file written by python -m faceage_jax.export.")
    model.add_argument("--workdir", help="A training run's directory (its newest checkpoint).")
    parser.add_argument("--step", type=int, help="With --workdir: the checkpoint step.")
    parser.add_argument("--config", help="With --workdir: the run's config file.")
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to listen on (default: this machine only)."
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument("--max-megapixels", type=float, default=age_photo.DEFAULT_MAX_MEGAPIXELS)
    parser.add_argument(
        "--queue",
        type=int,
        default=DEFAULT_QUEUE,
        help="Requests waiting or being aged before a 503.",
    )
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0 or args.queue < 1:
        parser.error("--max-upload-mb, --max-megapixels and --queue must be positive")
    import uvicorn

    try:
        generators = age_photo.load_generators(args.exported, args.workdir, args.step, args.config)
    except (FileNotFoundError, export.ExportError, faces.MissingModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    service = AgingService(
        generators,
        max_upload_mb=args.max_upload_mb,
        queue=args.queue,
        max_megapixels=args.max_megapixels,
    )
    where = (
        "this machine only; --host 0.0.0.0 lets others on your network reach it"
        if args.host in ("127.0.0.1", "localhost", "::1")
        else f"reachable by anyone who can reach {args.host}"
    )
    print(f"Serving {generators.description}", flush=True)
    print(f"Open http://{args.host}:{args.port}/ ({where}).", flush=True)
    # Access logs name paths and statuses only; uploads are never logged.
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


def run():
    """The console script `faceage-serve` and `python -m faceage_jax.serve`."""
    sys.exit(main())


if __name__ == "__main__":
    run()
