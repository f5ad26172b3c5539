"""A small OpenID provider for the tests: discovery, JWKS and token minting over real HTTPS.

It serves, on 127.0.0.1 with a certificate from a trustme CA:

- ``<issuer>/.well-known/openid-configuration`` naming ``jwks_uri``;
- ``<issuer>/keys``, the JWK Set of the keys currently published.

Keys are RS256 (RSA 2048) or ES256 (P-256); tests add and remove them to
rotate, and set :attr:`FakeIdP.mode` to make the provider misbehave:
``"up"``, ``"down"`` (the connection is closed without an answer),
``"error"`` (HTTP 500), ``"bad_json"``, ``"huge"`` (a body over the relay's
limit), ``"hang"`` (never answers) or ``"wrong_issuer"`` (discovery names
another issuer).
"""

from __future__ import annotations

import json
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Any

import h11
import jwt
import trio
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

__all__ = ["FakeIdP", "IdPKey"]


@dataclass
class IdPKey:
    kid: str
    alg: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algo = RSAAlgorithm if self.alg == "RS256" else ECAlgorithm
        jwk = json.loads(algo.to_jwk(self.private.public_key()))
        return jwk | {"kid": self.kid, "use": "sig", "alg": self.alg}


@dataclass
class FakeIdP:
    """The provider; start it with ``await nursery.start(idp.serve)``."""

    ca: trustme.CA
    realm: str = "/realms/dev"
    mode: str = "up"
    keys: list[IdPKey] = field(default_factory=list)
    port: int = 0
    # Requests answered (or refused) per path kind.
    discovery_hits: int = 0
    jwks_hits: int = 0
    _hit: trio.Event = field(default_factory=trio.Event)

    async def wait_discovery_hits(self, count: int) -> None:
        """Wait until the discovery document was asked for ``count`` times in all."""
        while self.discovery_hits < count:
            await self._hit.wait()

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.port}{self.realm}"

    def add_key(self, alg: str = "RS256") -> IdPKey:
        if alg == "RS256":
            private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(alg)
        key = IdPKey(kid=secrets.token_hex(8), alg=alg, private=private)
        self.keys.append(key)
        return key

    def remove_key(self, key: IdPKey) -> None:
        self.keys.remove(key)

    def mint(
        self,
        key: IdPKey,
        *,
        now: float,
        sub: str = "alice",
        aud: str | list[str] = "dbgrelay",
        ttl: float = 3600,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        payload = {
            "iss": self.issuer,
            "aud": aud,
            "sub": sub,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "jti": secrets.token_hex(8),
        } | claims
        return jwt.encode(
            payload, key.private, algorithm=key.alg, headers={"kid": key.kid} | (headers or {})
        )

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        cert = self.ca.issue_cert("127.0.0.1")
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(server_ctx)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def handle(raw: trio.SocketStream) -> None:
            stream = trio.SSLStream(raw, server_ctx, server_side=True)
            try:
                await self._handle(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
                pass
            finally:
                await trio.aclose_forcefully(stream)

        await trio.serve_listeners(handle, listeners, task_status=task_status)

    async def _handle(self, stream: trio.SSLStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Request):
                break
            if isinstance(event, h11.ConnectionClosed):
                return
        path = event.target.decode()
        if path == f"{self.realm}/.well-known/openid-configuration":
            self.discovery_hits += 1
            self._hit.set()
            self._hit = trio.Event()
            doc: Any = {
                "issuer": "https://evil.example" if self.mode == "wrong_issuer" else self.issuer,
                "jwks_uri": f"{self.issuer}/keys",
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
        elif path == f"{self.realm}/keys":
            self.jwks_hits += 1
            doc = self.jwks()
        else:
            doc = None
        if self.mode == "down":
            return
        if self.mode == "hang":
            await trio.sleep_forever()
        status, body = 200, json.dumps(doc).encode()
        if doc is None:
            status, body = 404, b"{}"
        elif self.mode == "error":
            status, body = 500, b"internal error"
        elif self.mode == "bad_json":
            body = b'{"keys": [ this is not json'
        elif self.mode == "huge":
            body = b'{"keys": [], "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        headers = [("content-type", "application/json"), ("connection", "close")]
        if self.mode != "huge":
            # Without a length, h11 sends the huge body chunked: the relay
            # must stop reading at its cap, not trust a header.
            headers.append(("content-length", str(len(body))))
        out = conn.send(h11.Response(status_code=status, headers=headers))
        await stream.send_all(out)
        for start in range(0, len(body), 65536):
            await stream.send_all(conn.send(h11.Data(data=body[start : start + 65536])))
        await stream.send_all(conn.send(h11.EndOfMessage()))
