"""Authenticated scrapes of /metrics: a bearer token, TLS client certificates, or both.

Every test scrapes for real over loopback with the standard library's HTTP
client (in a worker thread), as Prometheus would: real HTTPS with trustme
certificates, a real token in the Authorization header.
"""

from __future__ import annotations

import functools
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
import trustme

from config import MetricsSection
from relay.errors import LocalProtocolError
from relay.httpd import listener_address, load_bearer_token, serve_metrics
from relay.metrics import Metrics

TOKEN = "3f9c2b7e4d1a8f60c5e2b9a7d4f1c8e3"


class Scrape:
    """What one scrape got: the status, the headers and the body."""

    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.body = status, body
        self.headers = {name.lower(): value for name, value in headers.items()}


def _scrape(url: str, token: str | None, context: ssl.SSLContext | None) -> Scrape:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return Scrape(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as exc:
        return Scrape(exc.code, exc.headers, exc.read())


async def scrape(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None):
    return await trio.to_thread.run_sync(_scrape, url, token, context)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(version="test", targets=["secret-box"])


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "scrape.token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path: Path, server_ca: trustme.CA, client_ca: trustme.CA) -> dict[str, Path]:
    server = server_ca.issue_cert("127.0.0.1")
    files = {
        "tls_cert": tmp_path / "metrics.pem",
        "tls_key": tmp_path / "metrics.key",
        "client_ca": tmp_path / "scrapers-ca.pem",
    }
    server.cert_chain_pems[0].write_to_path(files["tls_cert"])
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(files["tls_cert"], append=True)
    server.private_key_pem.write_to_path(files["tls_key"])
    client_ca.cert_pem.write_to_path(files["client_ca"])
    return files


def scraper_context(server_ca: trustme.CA, client: trustme.CA | None) -> ssl.SSLContext:
    """Prometheus' tls_config: trust the server's CA, present a client certificate."""
    context = ssl.create_default_context()
    server_ca.configure_trust(context)
    if client is not None:
        client.issue_cert("prometheus@monitoring").configure_cert(context)
    return context


async def start(nursery: trio.Nursery, section: MetricsSection, metrics: Metrics) -> str:
    listeners = await nursery.start(serve_metrics, section, metrics)
    return listener_address(listeners[0])


async def test_bearer_token_admits_the_scrape_that_sends_it(nursery, metrics, token_file):
    section = MetricsSection(listen=("127.0.0.1", 0), bearer_token_file=token_file)
    address = await start(nursery, section, metrics)

    good = await scrape(f"http://{address}/metrics", token=TOKEN)

    assert good.status == 200
    assert b'dbgrelay_sessions_active{target="secret-box"}' in good.body


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, "missing_token"),
        ("Bearer " + TOKEN[:-1] + "0", "invalid_token"),
        ("Bearer " + TOKEN + "0", "invalid_token"),
        ("Bearer ", "missing_token"),
        ("Basic " + TOKEN, "missing_token"),
        (TOKEN, "missing_token"),
    ],
    ids=["none", "wrong", "longer", "empty", "basic", "no-scheme"],
)
async def test_a_scrape_without_the_right_token_gets_401_and_no_target_names(
    nursery, metrics, token_file, header, error
):
    section = MetricsSection(listen=("127.0.0.1", 0), bearer_token_file=token_file)
    address = await start(nursery, section, metrics)

    def send() -> Scrape:
        request = urllib.request.Request(f"http://{address}/metrics")
        if header is not None:
            request.add_header("Authorization", header)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return Scrape(answer.status, answer.headers, answer.read())
        except urllib.error.HTTPError as exc:
            return Scrape(exc.code, exc.headers, exc.read())

    refused = await trio.to_thread.run_sync(send)

    assert refused.status == 401
    assert refused.headers["www-authenticate"].startswith('Bearer realm="dbgrelay metrics"')
    assert (error == "invalid_token") == (
        'error="invalid_token"' in refused.headers["www-authenticate"]
    )
    assert refused.body == f'{{"error": "{error}"}}'.encode()
    assert b"secret-box" not in refused.body


async def test_healthz_stays_open_behind_a_bearer_token(nursery, metrics, token_file):
    section = MetricsSection(listen=("127.0.0.1", 0), bearer_token_file=token_file)
    address = await start(nursery, section, metrics)
    health = await scrape(f"http://{address}/healthz")
    assert (health.status, health.body) == (200, b"ok\n")


async def test_readyz_follows_admission_while_healthz_stays_ok(nursery, metrics, token_file):
    section = MetricsSection(listen=("127.0.0.1", 0), bearer_token_file=token_file)
    reason: str | None = None
    listeners = await nursery.start(
        functools.partial(serve_metrics, section, metrics, unready=lambda: reason)
    )
    address = listener_address(listeners[0])

    ready = await scrape(f"http://{address}/readyz")
    reason = "state_unavailable"
    unready = await scrape(f"http://{address}/readyz")
    health = await scrape(f"http://{address}/healthz")

    # Open behind the bearer token, like /healthz: probes carry no credentials.
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert (unready.status, unready.body) == (503, b"unready: state_unavailable\n")
    assert (health.status, health.body) == (200, b"ok\n")


async def test_client_certificate_admits_an_https_scrape(
    nursery, metrics, tls_files, server_ca, client_ca
):
    section = MetricsSection(listen=("127.0.0.1", 0), **tls_files)
    address = await start(nursery, section, metrics)

    good = await scrape(f"https://{address}/metrics", context=scraper_context(server_ca, client_ca))

    assert good.status == 200
    assert b"dbgrelay_build_info" in good.body


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
async def test_https_scrape_without_a_trusted_client_certificate_is_refused(
    nursery, metrics, tls_files, server_ca, who
):
    section = MetricsSection(listen=("127.0.0.1", 0), **tls_files)
    address = await start(nursery, section, metrics)
    stranger = None if who == "no certificate" else trustme.CA()

    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        await scrape(f"https://{address}/metrics", context=scraper_context(server_ca, stranger))


async def test_plain_http_to_the_https_endpoint_gets_no_metrics(nursery, metrics, tls_files):
    section = MetricsSection(listen=("127.0.0.1", 0), **tls_files)
    address = await start(nursery, section, metrics)
    host, port = address.rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        got = bytearray()
        with trio.fail_after(10):
            try:
                while data := await stream.receive_some(65536):
                    got += data
            except trio.BrokenResourceError:
                pass
    assert b"dbgrelay_" not in got and b"secret-box" not in got


async def test_client_certificate_and_bearer_token_together_need_both(
    nursery, metrics, tls_files, token_file, server_ca, client_ca
):
    section = MetricsSection(listen=("127.0.0.1", 0), bearer_token_file=token_file, **tls_files)
    address = await start(nursery, section, metrics)
    context = scraper_context(server_ca, client_ca)

    without_token = await scrape(f"https://{address}/metrics", context=context)
    with_token = await scrape(f"https://{address}/metrics", context=context, token=TOKEN)

    assert without_token.status == 401
    assert with_token.status == 200 and b"dbgrelay_build_info" in with_token.body


@pytest.mark.parametrize("content", ["", "\n  \n", "two words", "caf\u00e9"])
def test_an_unusable_token_file_is_refused_with_one_line(tmp_path, content):
    path = tmp_path / "scrape.token"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LocalProtocolError) as info:
        load_bearer_token(path)
    message = str(info.value)
    assert message.startswith(f"metrics.bearer_token_file {path}") and "\n" not in message


def test_a_missing_token_file_is_refused_with_one_line(tmp_path):
    with pytest.raises(LocalProtocolError) as info:
        load_bearer_token(tmp_path / "absent")
    assert str(info.value).startswith(f"metrics.bearer_token_file {tmp_path / 'absent'}: ")
