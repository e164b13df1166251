"""``m2pt serve`` end to end: listen, load the adapter, answer until interrupted."""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
import sys
from pathlib import Path

from m2pt_cli.errors import UserError

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
BODY_MARGIN = 1 << 20  # bytes of JSON around the largest image a request may carry
HEADER_TIMEOUT_S = 10.0  # a connection that has not sent a whole request head by then is closed
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long (uvicorn's default)
MAX_HEADER_BYTES = 16 << 10  # a request head larger than this is a 400 (h11's default, made explicit)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or one line saying why not (before the model loads)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address here ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is already in use (pick another, or --port 0)") from None
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    return sock


def is_loopback(host: str) -> bool:
    """True for a name or address of this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def body_limit(max_image_bytes: int) -> int:
    """The request size limit: one image as base64 plus room for the conversation."""
    return math.ceil(max_image_bytes * 4 / 3) + BODY_MARGIN


def http_protocol(header_timeout_s: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol with a deadline for the request head: uvicorn times out only idle
    keep-alive connections, so a client that opens a connection and sends its headers a byte at a
    time (or nothing) would hold it for ever. Here a connection that has not started a request
    ``header_timeout_s`` after it opened, or after its last response, is closed."""
    import asyncio

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def _await_head(self) -> None:
            cycle = self.cycle  # a new request replaces it

            def expire() -> None:
                if self.cycle is cycle and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(header_timeout_s, expire)

    return HeadTimeoutProtocol


def server_config(app, queue_size: int, header_timeout_s: float = HEADER_TIMEOUT_S):
    """The uvicorn configuration ``m2pt serve`` runs ``app`` under: idle and slow connections
    dropped, headers bounded, connections bounded (past the limit uvicorn answers 503)."""
    import uvicorn

    return uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=5,
        http=http_protocol(header_timeout_s),
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=2 * queue_size + 32,  # open connections and tasks: the queue, streams, /health
    )


def run_server(
    source: Path,
    host: str,
    port: int,
    api_key: str | None,
    allow_local_images: bool,
    max_image_mb: float,
    max_batch_size: int,
    queue_size: int,
    max_new_tokens: int,
    base_model: str | None,
    device: str,
    max_prompt_tokens: int | None = None,
) -> None:
    """Serve the adapter at ``source`` until Ctrl-C or SIGTERM."""
    try:
        import uvicorn

        from m2pt_cli.serving.app import Settings, create_app
    except ImportError as exc:
        raise UserError(
            f"m2pt serve needs the serve extra ({exc.name} is missing): pip install 'm2pt[serve]'"
        ) from None
    from m2pt_cli.model_source import resolve_model_source
    from m2pt_cli.serving.engine import Engine
    from m2pt_cli.serving.requests import ImagePolicy

    resolved = resolve_model_source(source, base=base_model)
    sock = listen(host, port)
    try:
        loaded = resolved.load(device=device)
        name = Path(source).resolve().name
        max_bytes = int(max_image_mb * (1 << 20))
        policy = ImagePolicy(max_bytes, loaded.recipe.data.max_image_pixels, allow_local_images)
        hosts = LOOPBACK_NAMES | {host.strip("[]")} if is_loopback(host) else None
        settings = Settings(name, policy, body_limit(max_bytes), api_key, max_new_tokens, hosts, max_prompt_tokens)
        if hosts is None and api_key is None:
            print(f"m2pt: warning: {host} is reachable from other machines and --api-key is not set", file=sys.stderr)
        engine = Engine(loaded, max_batch_size, queue_size).start()
        bound_port = sock.getsockname()[1]
        where = f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}"
        print(f"m2pt: serving {name} on {device} at {where} (web page at /, OpenAI API at /v1)", file=sys.stderr)
        sys.stderr.flush()
        config = server_config(create_app(engine, settings), queue_size)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            engine.stop()
    finally:
        sock.close()
