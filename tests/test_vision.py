"""Vision chat with the tiny Qwen2-VL: base64 and URL images, several per message, resizing,
and the refusals that keep image URLs from reaching private addresses."""

from __future__ import annotations

import base64
import glob
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import ray
from PIL import Image

from tests.conftest import run_app

VL = "tiny-qwen2-vl"
CHAT = "/v1/chat/completions"


def png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_chat(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


class ImageServer:
    """A local HTTP server on a free loopback port that counts the requests it gets."""

    def __init__(self):
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                if self.path == "/slow.png":
                    time.sleep(5)
                body, kind = (b"just some text", "text/plain") if self.path == "/notes.txt" else (png(320, 200), "image/png")
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def lan_url(demo_models, serve_port, base_url) -> str:
    """An app whose operator allowed image URLs on loopback (as on a LAN), 1 s fetch timeout."""
    args = {
        "image_allow_hosts": ["127.0.0.1"],
        "image_fetch_timeout": "1s",
        "models": [{"id": VL, "path": "models/tiny-qwen2-vl"}],
    }
    return run_app(args, name="mlx-fleet-lan", route_prefix="/lan")


def test_one_base64_image_plain_and_streamed(client):
    messages = image_chat(data_url(png(64, 64)))
    reply = client.chat.completions.create(model=VL, messages=messages, max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    text_only = client.chat.completions.create(
        model=VL, messages=[{"role": "user", "content": "What is in the picture?"}], max_tokens=1
    )
    assert reply.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image became tokens
    chunks = list(client.chat.completions.create(
        model=VL, messages=messages, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 5


def test_two_images_in_one_message_and_across_messages(client):
    one = client.chat.completions.create(model=VL, messages=image_chat(data_url(png(64, 64))), max_tokens=1)
    two = client.chat.completions.create(
        model=VL, messages=image_chat(data_url(png(64, 64)), data_url(png(64, 64, (0, 0, 255)))), max_tokens=1
    )
    assert two.usage.prompt_tokens > one.usage.prompt_tokens
    across = image_chat(data_url(png(64, 64))) + [{"role": "assistant", "content": "a red square"}] + image_chat(
        data_url(png(96, 64, (0, 200, 0))), text="and this one?"
    )
    reply = client.chat.completions.create(model=VL, messages=across, max_tokens=3)
    assert reply.usage.prompt_tokens > two.usage.prompt_tokens


def test_large_image_is_resized_before_the_model(client):
    big = io.BytesIO()
    Image.new("RGB", (5000, 3000), (10, 120, 200)).save(big, "JPEG", quality=70)
    reply = client.chat.completions.create(
        model=VL, messages=image_chat(data_url(big.getvalue(), "image/jpeg")), max_tokens=2, temperature=0
    )
    assert reply.usage.completion_tokens == 2
    logs_dir = ray._private.worker.global_worker.node.get_logs_dir_path()
    ingress_logs = glob.glob(f"{logs_dir}/serve/replica_mlx-fleet_fleet-ingress_*.log")
    text = "".join(open(path).read() for path in ingress_logs)
    assert "resized from 5000x3000 to 2048x1229" in text


def test_too_many_images_is_400(http):
    urls = [data_url(png(8, 8))] * 17
    response = http.post(CHAT, json={"model": VL, "messages": image_chat(*urls), "max_tokens": 1})
    assert response.status_code == 400
    assert "at most 16 images" in response.json()["error"]["message"]


def test_image_to_a_text_model_is_the_exact_400(http):
    response = http.post(CHAT, json={"model": "tiny-llama", "messages": image_chat(data_url(png(8, 8)))})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Model tiny-llama does not support vision"


@pytest.mark.parametrize(
    "url, words",
    [
        ("data:image/png;base64,not base64!!", "not valid base64"),
        (data_url(b"plain text, not an image"), "not an image"),
        ("http://169.254.169.254/latest/meta-data/", "not allowed"),
        ("http://10.0.0.1/cat.png", "not allowed"),
        ("ftp://example.com/cat.png", "ftp"),
    ],
)
def test_bad_images_are_400_naming_the_image(http, url, words):
    response = http.post(CHAT, json={"model": VL, "messages": image_chat(data_url(png(8, 8)), url), "max_tokens": 1})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert words in message and ("Image 2" in message)


def test_loopback_url_refused_without_the_allow_list(http, image_server):
    before = len(image_server.requests)
    response = http.post(CHAT, json={"model": VL, "messages": image_chat(f"{image_server.url}/cat.png"), "max_tokens": 1})
    assert response.status_code == 400
    assert "not allowed" in response.json()["error"]["message"]
    assert len(image_server.requests) == before  # no connection was made


def test_url_images_with_the_allow_list(lan_url, image_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{lan_url}/v1", api_key="x", max_retries=0)
    before = len(image_server.requests)
    stream = client.chat.completions.create(
        model=VL, messages=image_chat(f"{image_server.url}/cat.png", data_url(png(64, 64))), max_tokens=4, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert image_server.requests[before:] == ["/cat.png"]

    response = httpx.post(f"{lan_url}{CHAT}", json={"model": VL, "messages": image_chat(f"{image_server.url}/notes.txt")}, timeout=60)
    assert response.status_code == 400 and "text/plain" in response.json()["error"]["message"]

    started = time.monotonic()
    response = httpx.post(f"{lan_url}{CHAT}", json={"model": VL, "messages": image_chat(f"{image_server.url}/slow.png")}, timeout=60)
    assert response.status_code == 400 and "timed out" in response.json()["error"]["message"]
    assert time.monotonic() - started < 15
