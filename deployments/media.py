"""Images for vision models: data: and http(s) URLs in, RGB PIL images out, every failure a 400.

Fetching a URL the client chose turns this server into a proxy into its own network (SSRF).
So every host, on every redirect hop, is resolved and checked before any connection is made,
and the client this module builds connects only to the addresses that passed the check.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import ipaddress
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO

import httpcore
import httpx
from PIL import ExifTags, Image, ImageOps

from policies.errors import ApiError
from policies.logs import module_logger

logger = module_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
FIRST_BACKOFF_S = 0.2
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Pillow opens more formats than these, but some run external programs (EPS -> Ghostscript)
# or are rarely exercised parsers: not for bytes from strangers. (JPEG includes phones' MPO.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# What servers say when they do not know what they store (S3 uploads, some CDNs): Pillow decides.
UNTYPED_CONTENT_TYPES = ("application/octet-stream", "binary/octet-stream")
# IPv6 prefix of NAT64 (RFC 6052): the last 32 bits are the IPv4 address actually reached.
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# A decode holds the pixels several times over (decoded, RGB, resized): hundreds of MB at the
# pixel cap. Fifty requests with big images queue here instead of decoding fifty at once.
MAX_CONCURRENT_DECODES = 2
_DECODER = ThreadPoolExecutor(MAX_CONCURRENT_DECODES, thread_name_prefix="image-decode")


@dataclass(frozen=True)
class ImagePolicy:
    max_side: int = 2048  # longer side above this -> downscale keeping aspect ratio
    max_bytes: int = 20_000_000  # cap on encoded image bytes (base64-decoded or downloaded)
    timeout_s: float = 10.0  # deadline of one fetch attempt: connect, redirects and body
    retries: int = 2  # extra attempts after transient failures (connect, timeout, 5xx, 429)
    allow_hosts: tuple[str, ...] = ()  # names, IPs or CIDR networks allowed though not public


@dataclass(frozen=True)
class ImageRef:
    url: str  # data: URL or http(s) URL
    param: str  # JSON path for errors, e.g. "messages.0.content.1.image_url"


class _ImageError(Exception):
    """Why one image failed, in words for the client; `load_images` says which image."""


class _FetchFailed(Exception):
    """A download failed in a way retrying will not fix."""


class _Transient(Exception):
    """A download failed in a way that may pass on the next attempt."""


async def load_images(
    refs: list[ImageRef], policy: ImagePolicy, client: httpx.AsyncClient | None = None
) -> list[Image.Image]:
    """Decode or download every image concurrently; RGB images in the order of `refs`.

    Raises ApiError 400 naming the image (1-based) for anything wrong with the input. With
    no `client`, one is built that connects only to checked addresses. A caller's client
    (tests, a proxy setup) gets the same checks, but it resolves names again on connect,
    which leaves a DNS-rebinding window between the check and the connection.
    """
    allow_list = _AllowList.parse(policy.allow_hosts)
    pins: dict[str, list[str]] | None = None
    own_client = client is None
    if client is None:
        backend = _PinnedBackend()
        pins = backend.pins
        client = _pinned_client(backend)
    fetcher = _Fetcher(policy, allow_list, client, pins)
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_load_one(number, ref, policy, fetcher))
                for number, ref in enumerate(refs, start=1)
            ]
    except ExceptionGroup as failures:
        # The group cancels the other images on the first failure. Raise one plain exception,
        # as the caller expects: a bug (anything not an ApiError) before a bad image.
        bugs = [error for error in failures.exceptions if not isinstance(error, ApiError)]
        raise (bugs or failures.exceptions)[0] from None
    finally:
        if own_client:
            await client.aclose()
    return [task.result() for task in tasks]


async def _load_one(
    number: int, ref: ImageRef, policy: ImagePolicy, fetcher: _Fetcher
) -> Image.Image:
    try:
        # Decoding is CPU work (base64, Pillow): off the event loop so other requests keep going.
        if ref.url[:5].lower() == "data:":
            data = await asyncio.to_thread(_bytes_from_data_url, ref.url, policy.max_bytes)
        else:
            data = await fetcher.download(ref.url)
        # As asyncio.to_thread does, but on the bounded decode threads; the copied context keeps
        # Ray Serve's request id on the resize warning.
        decode = functools.partial(
            contextvars.copy_context().run, _decode_image, data, number, policy.max_side
        )
        return await asyncio.get_running_loop().run_in_executor(_DECODER, decode)
    except _ImageError as error:
        raise ApiError(400, f"Image {number}: {error}", param=ref.param) from None


# --- data: URLs ---------------------------------------------------------------------------


def _bytes_from_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise _ImageError("not a valid data: URL (no comma before the data)")
    media_type, *parameters = header.split(";")
    media_type = media_type.strip().lower()
    if not media_type.startswith("image/"):
        raise _ImageError(f"the data is not an image (content-type {media_type or 'missing'})")
    if not parameters or parameters[-1].strip().lower() != "base64":
        raise _ImageError("data: URLs must be base64, like data:image/png;base64,...")
    # Every 4 base64 characters hold 3 bytes: refuse text that cannot fit before decoding it.
    if len(payload) > 4 * -(-max_bytes // 3):
        raise _ImageError(_too_large(max_bytes))
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:  # binascii.Error, or characters outside ASCII
        raise _ImageError("not valid base64") from None
    if len(data) > max_bytes:
        raise _ImageError(_too_large(max_bytes))
    return data


# --- Pillow -------------------------------------------------------------------------------


def _decode_image(data: bytes, number: int, max_side: int) -> Image.Image:
    try:
        image = Image.open(BytesIO(data), formats=ALLOWED_FORMATS)  # the header, no pixels yet
        width, height = image.size
        _check_pixel_count(width, height)
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale on request, never below the size asked for:
        # a photo about to be downscaled costs a fraction of the memory. Other formats ignore it.
        image.draft("RGB", _fitted(width, height, max_side))
        _check_decoded_pixels(image.size, width, height, max_side)
        # verify() checks the whole file but leaves that image object unusable: use a throwaway.
        with Image.open(BytesIO(data), formats=ALLOWED_FORMATS) as probe:
            probe.verify()
        image.load()
        # Orientations 5 to 8 turn a quarter: the sides swap. (Asked after load(): a PNG's
        # getexif() would load it.)
        if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):
            width, height = height, width
        ImageOps.exif_transpose(image, in_place=True)  # phones store photos sideways + a tag
        image = _to_rgb(image)
    except _ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # The warning arrives as an exception where warnings are errors (python -W error).
        raise _ImageError(f"the image has too many pixels to decode safely ({error})") from None
    except Image.UnidentifiedImageError:
        raise _ImageError(
            "the data is not an image (not a JPEG, PNG, GIF, WebP, BMP or TIFF file)"
        ) from None
    except Exception as error:  # Pillow reports corrupt files with many exception types
        raise _ImageError(f"the image data is corrupt or truncated ({error})") from None

    # From the header's size, not the draft's: the draft's sides are rounded up.
    if max(width, height) > max_side:
        size = _fitted(width, height, max_side)
        image = image.resize(size, Image.Resampling.LANCZOS)
        logger.warning(
            "image %d resized from %dx%d to %dx%d (image_max_side=%d)",
            number, width, height, *size, max_side,
        )
    return image


def _check_pixel_count(width: int, height: int) -> None:
    # Image.open itself only refuses beyond twice the limit (below that it merely warns).
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise _ImageError(
            f"the image is {width}x{height} pixels, more than the {limit} this server decodes"
        )


def _check_decoded_pixels(
    decoded: tuple[int, int], width: int, height: int, max_side: int
) -> None:
    # Pillow's limit is ~90 M pixels per image (~270 MB as RGB), several per request. Everything
    # is downscaled to max_side anyway: twice that on each side is detail to spare. A JPEG
    # counts at its draft size, so a 48 M pixel photo still passes.
    limit = 4 * max_side**2
    if decoded[0] * decoded[1] > limit:
        raise _ImageError(
            f"{width}x{height} pixels is more than this server decodes"
            f" ({limit:,} pixels, 4 x image_max_side²)"
        )


def _fitted(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels often hold black; flatten onto white, as the Hugging Face image
        # processors do, so a dark logo on a transparent background stays visible.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, "white")
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _too_large(max_bytes: int) -> str:
    if max_bytes >= 1_000_000:
        return f"larger than {max_bytes / 1_000_000:g} MB"
    return f"larger than {max_bytes} bytes"


# --- Address checks -----------------------------------------------------------------------


@dataclass(frozen=True)
class _AllowList:
    names: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: tuple[str, ...]) -> _AllowList:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            try:  # a bare IP is a /32 (or /128) network
                networks.append(ipaddress.ip_network(entry.strip().strip("[]"), strict=False))
            except ValueError:
                names.add(_normal_name(entry))
        return cls(frozenset(names), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        if _normal_name(host) in self.names:
            return True
        embedded = _embedded_ipv4(address)
        candidates = [address] if embedded is None else [address, embedded]
        return any(ip in network for ip in candidates for network in self.networks)


def _normal_name(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address really reaches (::ffff:10.0.0.1, 6to4, NAT64)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


def _refusal_reason(address: IPAddress) -> str | None:
    """Why connecting to `address` could reach something internal; None if it is public."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return _refusal_reason(embedded)
    # Most specific first: 127.0.0.1 and 0.0.0.0 are also "private" to the ipaddress module.
    checks = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),  # counted as global by ipaddress
        ("reserved", address.is_reserved),
        ("private network", address.is_private),
        ("not globally routable", not address.is_global),  # e.g. 100.64.0.0/10 (CGNAT)
    )
    return next((reason for reason, refused in checks if refused), None)


def _literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def _resolve(host: str, port: int) -> list[IPAddress]:
    literal = _literal_ip(host)
    if literal is not None:
        return [literal]  # no DNS for a literal IP
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        failure = _Transient if error.errno == socket.EAI_AGAIN else _FetchFailed
        raise failure(f"could not resolve host {host} ({error.strerror})") from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


# --- Downloads ----------------------------------------------------------------------------


@dataclass
class _Fetcher:
    policy: ImagePolicy
    allow_list: _AllowList
    client: httpx.AsyncClient
    pins: dict[str, list[str]] | None  # checked addresses per host, when the client is ours

    async def download(self, url_text: str) -> bytes:
        url = _http_url(url_text)
        shown = _shorten(url_text)
        failure = ""
        for attempt in range(self.policy.retries + 1):
            if attempt:
                await asyncio.sleep(FIRST_BACKOFF_S * 2 ** (attempt - 1))
            try:
                # One deadline for the whole attempt: a server dribbling a byte every few
                # seconds would otherwise never trip the per-read timeout.
                async with asyncio.timeout(self.policy.timeout_s):
                    return await self._fetch(url)
            except (TimeoutError, httpx.TimeoutException):
                failure = f"timed out after {float(self.policy.timeout_s)} s"
            except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
                failure = str(error) or type(error).__name__
            except _Transient as error:
                failure = str(error)
            except (_FetchFailed, httpx.HTTPError) as error:
                raise _ImageError(f"could not fetch {shown}: {error}") from None
        raise _ImageError(f"could not fetch {shown}: {failure}")

    async def _fetch(self, url: httpx.URL) -> bytes:
        for hop in range(MAX_REDIRECTS + 1):
            await self._check_host(url, redirected=hop > 0)
            request = self.client.build_request(
                "GET",
                url,
                # identity: a compressed body would make max_bytes count the wrong bytes
                headers={"Accept": "image/*", "Accept-Encoding": "identity"},
                timeout=self.policy.timeout_s,  # a caller's client may have a shorter default
            )
            response = await self.client.send(request, stream=True, follow_redirects=False)
            try:
                location = response.headers.get("location")
                if response.status_code in REDIRECT_STATUSES and location:
                    url = _redirect_target(url, location)
                    continue
                return await self._read_body(response)
            finally:
                await response.aclose()
        raise _FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    async def _check_host(self, url: httpx.URL, redirected: bool) -> None:
        host = url.raw_host.decode("ascii")  # IDNA-encoded; IPv6 without brackets
        addresses = await _resolve(host, url.port or (443 if url.scheme == "https" else 80))
        for address in addresses:
            reason = _refusal_reason(address)
            if reason and not self.allow_list.allows(host, address):
                raise _ImageError(_refusal_message(url, host, address, reason, redirected))
        if self.pins is not None:
            self.pins[host] = [str(address) for address in addresses]

    async def _read_body(self, response: httpx.Response) -> bytes:
        status = f"server answered {response.status_code} {response.reason_phrase}".rstrip()
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(status)
        if response.status_code != 200:
            raise _FetchFailed(status)
        media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type and not media_type.startswith("image/"):
            if media_type not in UNTYPED_CONTENT_TYPES:
                raise _ImageError(f"the data is not an image (content-type {media_type})")
        max_bytes = self.policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise _ImageError(_too_large(max_bytes))
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise _ImageError(_too_large(max_bytes))
        return bytes(body)


def _http_url(text: str) -> httpx.URL:
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as error:
        raise _ImageError(f"not a valid URL ({error})") from None
    if url.scheme not in ("http", "https"):
        scheme = f"'{url.scheme}:'" if url.scheme else "a URL without a scheme"
        raise _ImageError(f"only http(s) and data: URLs are supported, not {scheme}")
    if not url.host:
        raise _ImageError("the URL has no host")
    return url


def _redirect_target(url: httpx.URL, location: str) -> httpx.URL:
    try:
        target = url.join(location)
    except httpx.InvalidURL:
        raise _FetchFailed(f"invalid redirect location {_shorten(location)}") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise _FetchFailed(f"redirected to unsupported URL {_shorten(str(target))}")
    return target


def _refusal_message(
    url: httpx.URL, host: str, address: IPAddress, reason: str, redirected: bool
) -> str:
    if _literal_ip(host) is not None:
        message = f"address {host} is not allowed ({reason})"
    else:
        message = f"host {host} resolves to {address}, which is not allowed ({reason})"
    if redirected:
        message = f"redirected to {_shorten(str(url))}: {message}"
    return f"{message}; add it to image_allow_hosts to allow it"


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- A client that connects only to checked addresses -------------------------------------


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the addresses the check approved for a host, never to a fresh DNS answer.

    A second lookup at connect time could return an internal address (DNS rebinding). TLS is
    unaffected: httpcore still sends SNI and verifies the certificate for the host name.
    """

    def __init__(self) -> None:
        self.pins: dict[str, list[str]] = {}
        self._network = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: list | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = self.pins.get(host)
        if not addresses:
            raise httpcore.ConnectError(f"{host} was not checked before connecting")
        for address in addresses[:-1]:  # e.g. localhost is ::1 and 127.0.0.1: try each
            try:
                return await self._network.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue
        return await self._network.connect_tcp(
            addresses[-1], port, timeout, local_address, socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


def _pinned_client(backend: _PinnedBackend) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment would resolve names itself, unchecked.
    transport = httpx.AsyncHTTPTransport(verify=_ssl_context(), trust_env=False)
    # httpx 0.28 has no public way to give its transport a network backend; its pool is
    # httpcore's documented connection pool, which takes one.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=_ssl_context(), network_backend=backend
    )
    return httpx.AsyncClient(transport=transport, trust_env=False)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # loading the CA bundle takes milliseconds: once
