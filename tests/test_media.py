"""deployments.media: data: and http(s) URLs become RGB images; every bad input is a 400.

No Ray. Downloads come from small HTTP servers started here on loopback, or from an httpx
transport that answers from a table without opening any socket: nothing leaves this machine.
Addresses that must be refused are only ever tried with that socketless transport (or, for
loopback, against a local server that must see no request).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from deployments import media
from deployments.media import ImagePolicy, ImageRef, load_images
from policies.errors import ApiError

PARAM = "messages.0.content.1.image_url"
LOCAL = ImagePolicy(allow_hosts=("127.0.0.1",), timeout_s=2.0, retries=0)
ALLOW_REMINDER = "; add it to image_allow_hosts to allow it"


# --- helpers ------------------------------------------------------------------------------


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def png(size: tuple[int, int] = (32, 16), mode: str = "RGB", color="red") -> bytes:
    return encode(Image.new(mode, size, color))


def noise_png(size: tuple[int, int]) -> bytes:
    """A PNG that does not compress, so its byte size is predictable from its pixels."""
    rng = random.Random(0)
    return encode(Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)))


def blank_png(size: tuple[int, int]) -> bytes:
    """A valid 1-bit black PNG, written by hand row by row: KBs, where Pillow would need MBs."""
    width, height = size
    row = bytes(1 + (width + 7) // 8)  # filter byte, then 8 pixels a byte
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def run_load(
    refs: list[ImageRef], policy: ImagePolicy, transport: httpx.AsyncBaseTransport | None = None
) -> list[Image.Image]:
    async def run() -> list[Image.Image]:
        if transport is None:
            return await load_images(refs, policy)
        async with httpx.AsyncClient(transport=transport) as client:
            return await load_images(refs, policy, client)

    return asyncio.run(run())


def load(urls: list[str], policy: ImagePolicy = ImagePolicy(), transport=None) -> list[Image.Image]:
    refs = [ImageRef(url, f"messages.0.content.{i}.image_url") for i, url in enumerate(urls)]
    return run_load(refs, policy, transport)


def load_error(url: str, policy: ImagePolicy = ImagePolicy(), transport=None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        run_load([ImageRef(url, PARAM)], policy, transport)
    error = caught.value
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", PARAM)
    assert error.message.startswith("Image 1: "), error.message
    return error


# --- a loopback HTTP server and a socketless transport ------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "image/png"})
    delay: float = 0.0  # before answering
    hold: float = 0.0  # after the headers, before the body
    send_length: bool = True  # False: the body ends when the connection closes


class _Handler(BaseHTTPRequestHandler):
    server: LocalServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        self.server.hosts.append(self.headers.get("Host"))
        replies = self.server.routes.get(self.path, [Reply(404, b"no such path")])
        reply = replies.pop(0) if len(replies) > 1 else replies[0]  # the last one repeats
        time.sleep(reply.delay)
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.send_length and "Content-Length" not in reply.headers:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(reply.hold)
            self.wfile.write(reply.body)
        except OSError:  # the client gave up first, as it should in some tests
            pass

    def log_message(self, *args) -> None:
        pass


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True  # handlers still sleeping for slow-server tests must not block exit

    def __init__(self, host: str):
        super().__init__((host, 0), _Handler)
        self.routes: dict[str, list[Reply]] = {}
        self.requests: list[str] = []  # paths, in request order
        self.hosts: list[str | None] = []  # Host headers, in request order

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.server_address[0]}:{self.server_address[1]}{path}"


def start_server(host: str) -> LocalServer:
    server = LocalServer(host)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def stop_server(server: LocalServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def server():
    server = start_server("127.0.0.1")
    yield server
    stop_server(server)


class RecordingTransport(httpx.AsyncBaseTransport):
    """Answers from a table without any socket, and records every request it is asked for."""

    def __init__(self, replies: dict[str, httpx.Response] | None = None):
        self.replies = replies or {}
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        return self.replies.get(str(request.url), httpx.Response(404))


def png_response(size: tuple[int, int]) -> httpx.Response:
    return httpx.Response(200, content=png(size), headers={"Content-Type": "image/png"})


# --- data: URLs and decoding --------------------------------------------------------------


def test_png_and_jpeg_decode_to_rgb_of_the_right_size():
    jpeg = encode(Image.new("RGB", (50, 30), "blue"), "JPEG")
    images = load([data_url(png((32, 16))), data_url(jpeg, "image/jpeg")])
    assert [(i.size, i.mode) for i in images] == [((32, 16), "RGB"), ((50, 30), "RGB")]
    assert images[0].getpixel((0, 0)) == (255, 0, 0)
    red, green, blue = images[1].getpixel((25, 15))
    assert blue > 200 and red < 50 and green < 50


def test_transparency_is_flattened_onto_white():
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    [loaded] = load([data_url(encode(image))])
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 0, 0)
    assert loaded.getpixel((3, 1)) == (255, 255, 255)


def test_grayscale_and_palette_images_become_rgb():
    images = load([data_url(png(mode="L", color=128)), data_url(png(mode="P", color=3))])
    assert [image.mode for image in images] == ["RGB", "RGB"]


def test_exif_orientation_is_applied():
    # Stored 40x20, red left half and blue right half; orientation 6 means "rotate 90°
    # clockwise to display", so the photo is 20x40 with red on top.
    image = Image.new("RGB", (40, 20), "blue")
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    [loaded] = load([data_url(encode(image, "JPEG", exif=exif), "image/jpeg")])
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.fixture
def serve_log(caplog, monkeypatch):
    # Ray, once imported by other tests, configures "ray.serve" itself: capture it directly.
    serve_logger = logging.getLogger("ray.serve")
    monkeypatch.setattr(serve_logger, "propagate", False)
    serve_logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="ray.serve")
    yield caplog
    serve_logger.removeHandler(caplog.handler)


def test_large_image_is_downscaled_with_its_aspect_ratio_and_a_warning(serve_log):
    [loaded] = load([data_url(png((5000, 3000), color="gray"))])
    assert (loaded.size, loaded.mode) == ((2048, 1229), "RGB")
    assert [record.getMessage() for record in serve_log.records] == [
        "image 1 resized from 5000x3000 to 2048x1229 (image_max_side=2048)"
    ]
    assert serve_log.records[0].levelno == logging.WARNING


def test_portrait_images_and_images_at_the_limit(serve_log):
    urls = [data_url(png((30, 100))), data_url(png((64, 10)))]
    portrait, at_limit = load(urls, ImagePolicy(max_side=64))
    assert portrait.size == (19, 64)
    assert at_limit.size == (64, 10)
    assert [record.getMessage() for record in serve_log.records] == [
        "image 1 resized from 30x100 to 19x64 (image_max_side=64)"
    ]


@pytest.mark.parametrize(
    "url, words",
    [
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # padding missing
        ("data:image/png;base64,aGVsbG8\nd29ybGQ=", "not valid base64"),  # a line break
        ("data:image/png;base64,aGVsbG8é=", "not valid base64"),  # not even ASCII
        (data_url(b"hello, world"), "the data is not an image"),
        (data_url(b"hello", "text/plain"), "the data is not an image (content-type text/plain)"),
        ("data:;base64,aGk=", "the data is not an image (content-type missing)"),
        ("data:image/png," + base64.b64encode(png()).decode(), "must be base64"),
        ("data:image/png;base64", "not a valid data: URL"),
        (data_url(png()[:60]), "corrupt or truncated"),
        # PPM is an image Pillow reads, but not one of the formats accepted from clients.
        (data_url(b"P6 2 2 255\n" + bytes(12), "image/x-portable-pixmap"), "not an image"),
    ],
)
def test_bad_data_urls_are_400_naming_the_image(url, words):
    error = load_error(url)
    assert words in error.message, error.message


def test_the_index_and_param_of_the_failing_image_are_reported():
    refs = [
        ImageRef(data_url(png()), "messages.0.content.0.image_url"),
        ImageRef("data:image/png;base64,%%", "messages.2.content.3.image_url"),
    ]
    with pytest.raises(ApiError) as caught:
        run_load(refs, ImagePolicy())
    assert caught.value.message == "Image 2: not valid base64"
    assert caught.value.param == "messages.2.content.3.image_url"


def test_max_bytes_applies_to_the_decoded_data():
    image = noise_png((24, 24))
    [loaded] = load([data_url(image)], ImagePolicy(max_bytes=len(image)))  # exactly at the cap
    assert loaded.size == (24, 24)
    error = load_error(data_url(image), ImagePolicy(max_bytes=len(image) - 1))
    assert error.message == f"Image 1: larger than {len(image) - 1} bytes"
    # Base64 text far too long is refused by its length alone, before any decoding.
    error = load_error("data:image/png;base64," + "!" * 100_000, ImagePolicy(max_bytes=1000))
    assert error.message == "Image 1: larger than 1000 bytes"
    error = load_error("data:image/png;base64," + "A" * 27_000_000)  # the default cap
    assert error.message == "Image 1: larger than 20 MB"


@settings(max_examples=60, deadline=None)
@given(
    base=st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.none() | st.integers(0, 10**6),
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's remarks on corrupt metadata
def test_corrupted_images_are_a_400_or_an_image_never_another_error(base, edits, cut):
    data = bytearray(encode(Image.new("RGB", (12, 9), "teal"), base))
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    try:
        [image] = load([data_url(bytes(data))])
    except ApiError as error:
        assert error.status == 400 and error.message.startswith("Image 1: ")
    else:
        assert image.mode == "RGB"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_400(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    # Between the limit and twice it Pillow only warns: the module refuses by itself.
    error = load_error(data_url(png((40, 40))))
    assert "the image is 40x40 pixels, more than the 1000 this server decodes" in error.message
    # Beyond twice the limit Pillow raises DecompressionBombError, which must not become a 500.
    error = load_error(data_url(png((100, 100))))
    assert "too many pixels" in error.message


def test_too_many_pixels_are_refused_from_the_header_before_decoding():
    big = blank_png((9000, 9000))  # 243 MB as RGB
    assert len(big) < 20_000
    cut = big[:200]  # the header and the start of the pixel data
    for data in (big, cut):
        with pytest.raises(ApiError) as caught:
            load([data_url(png()), data_url(data)])
        assert caught.value.message == (
            "Image 2: 9000x9000 pixels is more than this server decodes"
            " (16,777,216 pixels, 4 x image_max_side²)"
        )
    # Under a cap that fits, the cut image fails as it decodes: so the refusal above came first.
    error = load_error(data_url(cut), ImagePolicy(max_side=4500))
    assert "corrupt or truncated" in error.message, error.message


def test_the_pixel_cap_is_four_times_max_side_squared():
    policy = ImagePolicy(max_side=64)  # 16,384 pixels
    [image] = load([data_url(png((128, 128)))], policy)
    assert image.size == (64, 64)
    error = load_error(data_url(png((129, 128))), policy)
    assert error.message == (
        "Image 1: 129x128 pixels is more than this server decodes"
        " (16,384 pixels, 4 x image_max_side²)"
    )


@pytest.mark.parametrize(
    "orientation, shown, resized", [(1, "4000x3000", (512, 384)), (6, "3000x4000", (384, 512))]
)
def test_large_jpeg_is_decoded_at_a_reduced_scale(serve_log, orientation, shown, resized):
    # 12 M pixels are far over the 1 M cap of max_side 512: this passes only because the JPEG
    # decodes at 1/4 scale (1000x750), then is resized as any other image.
    image = Image.new("RGB", (4000, 3000), "blue")
    image.paste((255, 0, 0), (0, 0, 2000, 3000))  # red left half
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = encode(image, "JPEG", exif=exif)
    [loaded] = load([data_url(jpeg, "image/jpeg")], ImagePolicy(max_side=512))
    assert (loaded.size, loaded.mode) == (resized, "RGB")
    assert [record.getMessage() for record in serve_log.records] == [
        f"image 1 resized from {shown} to {resized[0]}x{resized[1]} (image_max_side=512)"
    ]
    red = loaded.getpixel((10, 10))  # top left: red either way (orientation 6 puts it on top)
    assert red[0] > 200 and red[2] < 60


def test_at_most_two_images_decode_at_once(monkeypatch):
    real_decode = media._decode_image
    lock = threading.Lock()
    running = peak = 0

    def counting_decode(*args) -> Image.Image:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.1)  # long enough for every other decode to be waiting
            return real_decode(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(media, "_decode_image", counting_decode)

    async def three_requests() -> list[list[Image.Image]]:
        requests = [
            [ImageRef(data_url(png((width, 1))), PARAM) for width in (n, n + 10)]
            for n in (1, 2, 3)
        ]
        return await asyncio.gather(*(load_images(refs, ImagePolicy()) for refs in requests))

    results = asyncio.run(three_requests())
    assert [[image.size for image in images] for images in results] == [
        [(1, 1), (11, 1)], [(2, 1), (12, 1)], [(3, 1), (13, 1)]
    ]
    assert peak == media.MAX_CONCURRENT_DECODES == 2


# --- downloads from a loopback server -----------------------------------------------------


def test_download_from_an_allowed_host(server):
    server.routes["/cat.png"] = [Reply(body=png((20, 10)))]
    [image] = load([server.url("/cat.png")], LOCAL)
    assert (image.size, image.mode) == ((20, 10), "RGB")
    assert server.requests == ["/cat.png"]


@pytest.mark.parametrize(
    "host, allow",
    [
        ("127.0.0.1", ("127.0.0.0/8",)),
        ("localhost", ("localhost",)),
        ("localhost", ("LOCALHOST.", "10.0.0.1")),  # names compare like DNS does
    ],
)
def test_allow_hosts_takes_names_ips_and_networks(server, host, allow):
    server.routes["/cat.png"] = [Reply(body=png((20, 10)))]
    [image] = load([server.url("/cat.png", host)], ImagePolicy(allow_hosts=allow))
    assert image.size == (20, 10)


def test_a_name_is_resolved_once_and_that_answer_is_connected_to(server, monkeypatch):
    # DNS rebinding: a name answers a public address for the check and an internal one for
    # the connection. The default client must connect to the checked answer, not ask again.
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host  # anyio passes bytes
        lookups.append(name)
        address = "127.0.0.1" if name == "images.example" else host
        # AI_NUMERICHOST: any other name fails here instead of reaching a real DNS server.
        return real_getaddrinfo(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    server.routes["/cat.png"] = [Reply(body=png((9, 4)))]
    port = server.server_address[1]
    url = f"http://images.example:{port}/cat.png"
    [image] = load([url], ImagePolicy(allow_hosts=("images.example",)))
    assert image.size == (9, 4)
    assert lookups.count("images.example") == 1
    assert server.hosts == [f"images.example:{port}"]  # the Host header keeps the name


def test_untyped_content_is_accepted_when_it_is_an_image(server):
    octet_stream = {"Content-Type": "application/octet-stream"}
    server.routes["/blob"] = [Reply(body=png(), headers=octet_stream)]
    assert load([server.url("/blob")], LOCAL)[0].size == (32, 16)


def test_text_served_as_an_image_is_400_naming_the_content_type(server):
    html = {"Content-Type": "text/html; charset=utf-8"}
    server.routes["/cat.png"] = [Reply(body=b"<html>nope</html>", headers=html)]
    error = load_error(server.url("/cat.png"), LOCAL)
    assert error.message == "Image 1: the data is not an image (content-type text/html)"


def test_slow_server_times_out_after_every_attempt(server):
    server.routes["/slow.png"] = [Reply(body=png(), delay=3.0)]
    policy = ImagePolicy(allow_hosts=("127.0.0.1",), timeout_s=0.3, retries=1)
    started = time.monotonic()
    error = load_error(server.url("/slow.png"), policy)
    elapsed = time.monotonic() - started
    url = server.url("/slow.png")
    assert error.message == f"Image 1: could not fetch {url}: timed out after 0.3 s"
    expected = 0.3 * 2 + 0.2  # two attempts and one backoff
    assert expected <= elapsed < expected + 0.8, elapsed
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_failure_then_success_is_retried(server, status):
    server.routes["/flaky.png"] = [Reply(status, b"busy"), Reply(body=png((8, 8)))]
    [image] = load([server.url("/flaky.png")], ImagePolicy(allow_hosts=("127.0.0.1",)))
    assert image.size == (8, 8)
    assert server.requests == ["/flaky.png", "/flaky.png"]


def test_retries_give_up_with_the_last_status(server):
    server.routes["/down.png"] = [Reply(503, b"down")]
    policy = ImagePolicy(allow_hosts=("127.0.0.1",), retries=1)
    error = load_error(server.url("/down.png"), policy)
    assert error.message.endswith("server answered 503 Service Unavailable")
    assert len(server.requests) == 2


def test_client_errors_are_not_retried(server):
    url = server.url("/missing.png")
    error = load_error(url, ImagePolicy(allow_hosts=("127.0.0.1",)))
    assert error.message == f"Image 1: could not fetch {url}: server answered 404 Not Found"
    assert server.requests == ["/missing.png"]


def test_connection_refused_is_a_400(server):
    url = server.url("/x.png")
    stop_server(server)  # nothing listens on that port any more
    error = load_error(url, ImagePolicy(allow_hosts=("127.0.0.1",), retries=1))
    assert error.message.startswith(f"Image 1: could not fetch {url}: ")


def test_redirects_are_followed_on_allowed_hosts(server):
    server.routes["/old.png"] = [Reply(301, headers={"Location": "/new.png"})]
    server.routes["/new.png"] = [Reply(body=png((5, 7)))]
    [image] = load([server.url("/old.png")], LOCAL)
    assert image.size == (5, 7)
    assert server.requests == ["/old.png", "/new.png"]


def test_redirect_to_a_host_that_is_not_allowed_is_refused_before_connecting(server):
    other = start_server("127.0.0.2")  # loopback too, but not in allow_hosts
    try:
        other.routes["/secret.png"] = [Reply(body=png())]
        target = other.url("/secret.png")
        server.routes["/go.png"] = [Reply(302, headers={"Location": target})]
        error = load_error(server.url("/go.png"), LOCAL)
        assert error.message == (
            f"Image 1: redirected to {target}: address 127.0.0.2 is not allowed (loopback)"
            + ALLOW_REMINDER
        )
        assert server.requests == ["/go.png"]
        assert other.requests == []
    finally:
        stop_server(other)


def test_redirect_loops_stop_after_five_hops(server):
    server.routes["/loop.png"] = [Reply(302, headers={"Location": "/loop.png"})]
    error = load_error(server.url("/loop.png"), LOCAL)
    assert error.message.endswith("more than 5 redirects")
    assert len(server.requests) == 6


def test_too_large_content_length_is_refused_without_reading_the_body(server):
    # The server declares 1 GB, then stalls: reading the body would wait for the timeout.
    headers = {"Content-Type": "image/png", "Content-Length": str(10**9)}
    server.routes["/huge.png"] = [Reply(headers=headers, hold=3.0)]
    started = time.monotonic()
    error = load_error(server.url("/huge.png"), ImagePolicy(allow_hosts=("127.0.0.1",)))
    assert error.message == "Image 1: larger than 20 MB"
    assert time.monotonic() - started < 1.0


def test_a_body_without_length_stops_at_max_bytes(server):
    server.routes["/stream.png"] = [Reply(body=bytes(50_000), send_length=False)]
    policy = ImagePolicy(allow_hosts=("127.0.0.1",), max_bytes=10_000)
    error = load_error(server.url("/stream.png"), policy)
    assert error.message == "Image 1: larger than 10000 bytes"


def test_two_images_come_back_in_order(server):
    server.routes["/slow-first.png"] = [Reply(body=png((11, 3)), delay=0.3)]
    images = load([server.url("/slow-first.png"), data_url(png((3, 11)))], LOCAL)
    assert [image.size for image in images] == [(11, 3), (3, 11)]


# --- SSRF: internal addresses are refused before any connection ---------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_is_refused_without_the_allow_list(server, host):
    server.routes["/cat.png"] = [Reply(body=png())]
    error = load_error(server.url("/cat.png", host))
    assert error.message.endswith("is not allowed (loopback)" + ALLOW_REMINDER)
    assert server.requests == []


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1/", "address 127.0.0.1 is not allowed (loopback)"),
        ("http://169.254.169.254/latest/", "address 169.254.169.254 is not allowed (link-local)"),
        ("http://10.0.0.1/cat.png", "address 10.0.0.1 is not allowed (private network)"),
        ("https://192.168.1.1:8443/a.png", "address 192.168.1.1 is not allowed (private network)"),
        ("http://[::1]:8080/cat.png", "address ::1 is not allowed (loopback)"),
        ("http://0.0.0.0/", "address 0.0.0.0 is not allowed (unspecified)"),
        ("http://[::ffff:10.0.0.1]/", "address ::ffff:10.0.0.1 is not allowed (private network)"),
        (
            "http://[::ffff:169.254.169.254]/",
            "address ::ffff:169.254.169.254 is not allowed (link-local)",
        ),
        ("http://[fe80::1]/", "address fe80::1 is not allowed (link-local)"),
        ("http://100.64.0.1/", "address 100.64.0.1 is not allowed (not globally routable)"),
        ("http://224.0.0.1/", "address 224.0.0.1 is not allowed (multicast)"),
    ],
)
def test_internal_addresses_are_refused_before_any_request(url, reason):
    transport = RecordingTransport()
    started = time.monotonic()
    error = load_error(url, ImagePolicy(allow_hosts=("127.0.0.2",)), transport)
    assert error.message == f"Image 1: {reason}{ALLOW_REMINDER}"
    assert transport.requests == []
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    "url, allow",
    [
        ("http://10.1.2.3/cat.png", "10.0.0.0/8"),
        ("http://10.1.2.3/cat.png", "10.1.2.3"),
        ("http://[::ffff:10.1.2.3]/cat.png", "10.1.2.3"),
    ],
)
def test_an_allowed_network_reaches_the_transport(url, allow):
    transport = RecordingTransport({url: png_response((6, 6))})
    [image] = load([url], ImagePolicy(allow_hosts=(allow,)), transport)
    assert image.size == (6, 6)
    assert transport.requests == [url]


def test_redirect_to_cloud_metadata_is_refused_before_the_request():
    metadata = "http://169.254.169.254/latest/meta-data/"
    transport = RecordingTransport(
        {"http://10.1.2.3/cat.png": httpx.Response(302, headers={"Location": metadata})}
    )
    error = load_error("http://10.1.2.3/cat.png", ImagePolicy(allow_hosts=("10.1.2.3",)), transport)
    assert error.message == (
        f"Image 1: redirected to {metadata}: address 169.254.169.254 is not allowed (link-local)"
        + ALLOW_REMINDER
    )
    assert transport.requests == ["http://10.1.2.3/cat.png"]


@pytest.mark.parametrize(
    "url, words",
    [
        ("file:///etc/passwd", "only http(s) and data: URLs are supported, not 'file:'"),
        ("ftp://127.0.0.1/cat.png", "not 'ftp:'"),
        ("gopher://127.0.0.1:70/_x", "not 'gopher:'"),
        ("cat.png", "not a URL without a scheme"),
        ("http:///cat.png", "no host"),
    ],
)
def test_other_schemes_are_400(url, words):
    transport = RecordingTransport()
    error = load_error(url, ImagePolicy(allow_hosts=("127.0.0.1",)), transport)
    assert words in error.message, error.message
    assert transport.requests == []
