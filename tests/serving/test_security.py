"""No server-side paths, image URLs only from allow-listed public hosts (pinned, no redirects, limited),
the defaults: loopback binding, and settings that print without their API key."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import httpx
import pytest

from rge.serving import ServerSettings
from rge.serving.request_images import host_allowed

from ..test_candidates import cosine
from .conftest import png_bytes, running_server

PICTURE = png_bytes((10, 120, 200), (80, 60))


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A 127.0.0.1 HTTP server: /ok.png, /big.png (over 1 KiB), /moved (302 to /ok.png), else 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/ok.png")
                self.end_headers()
                return
            bodies = {"/ok.png": PICTURE, "/big.png": PICTURE + b"\0" * 4096}
            if self.path == "/short.png":  # declares more than it sends, then closes
                self.send_response(200)
                self.send_header("Content-Length", str(len(PICTURE)))
                self.end_headers()
                self.wfile.write(PICTURE[:100])
                return
            if self.path not in bodies:
                self.send_error(404)
                return
            body = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def error_of(url: str, image: str) -> str:
    response = httpx.post(f"{url}/v1/embeddings", json={"input": ["fine", {"text": "x", "image": image}]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input[1].image"
    return str(response.json()["error"]["message"])


def test_server_paths_are_never_read(server, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(PICTURE)
    for path in (str(secret), "/etc/hostname", "file:///etc/hostname", "../secret.png"):
        assert "file paths are not read by the server" in error_of(server[0], path)


def test_image_urls_are_refused_unless_allowed(server, image_host):
    assert "image URLs are disabled" in error_of(server[0], f"{image_host}/ok.png")


def test_allowed_hosts_on_private_addresses_are_refused_unless_enabled(encoder, image_host):
    with running_server(encoder, image_hosts=("127.0.0.1",)) as (url, _):
        assert "private or loopback address" in error_of(url, f"{image_host}/ok.png")
    with running_server(encoder, image_hosts=("localhost.example",), private_image_hosts=True) as (url, _):
        assert "not allowed on this server" in error_of(url, f"{image_host}/ok.png")


def test_an_allowed_url_is_fetched_within_limits_without_redirects(encoder, image_host):
    with running_server(encoder, image_hosts=("127.0.0.1",), private_image_hosts=True,
                        image_fetch_max_bytes=1024) as (url, _):  # fmt: skip
        response = httpx.post(f"{url}/v1/embeddings", json={"input": [{"text": "x", "image": f"{image_host}/ok.png"}]})
        assert response.status_code == 200
        expected = encoder.encode_document({"text": "x", "image": PICTURE})
        assert cosine(expected, response.json()["data"][0]["embedding"]) >= 0.9999
        assert "HTTP 302 (redirects are not followed)" in error_of(url, f"{image_host}/moved")
        assert "fetches at most 1024" in error_of(url, f"{image_host}/big.png")
        assert "HTTP 404" in error_of(url, f"{image_host}/missing.png")
        assert f"ended after 100 of its {len(PICTURE)} bytes" in error_of(url, f"{image_host}/short.png")


def test_host_allow_list_rules():
    assert host_allowed("images.example.com", ("images.example.com",))
    assert not host_allowed("evil.com", ("images.example.com",))
    assert host_allowed("a.b.example.com", (".example.com",)) and host_allowed("example.com", (".example.com",))
    assert not host_allowed("notexample.com", (".example.com",))
    assert not host_allowed("example.com.evil.net", ("example.com", ".example.com"))


def test_the_command_binds_to_loopback_by_default():
    from rge.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.api_key is None and not args.allow_image_host


def test_printed_settings_do_not_show_the_api_key():
    settings = ServerSettings(api_key="sk-secret-123", batch_size=8)
    assert "sk-secret" not in repr(settings) and "batch_size=8" in repr(settings)
