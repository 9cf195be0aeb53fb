"""Run the API with uvicorn: listen first (a port in use is one line, before the model loads), load
the model in the app's lifespan, say where it is served, and drain in-flight requests on SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from typing import Any

from kiln.errors import KilnError
from kiln.serve.settings import ServeSettings

log = logging.getLogger("kiln")

# Seconds SIGTERM waits for in-flight requests before cancelling them (a batch, even a long
# generation, finishes well within it).
GRACEFUL_SECONDS = 30


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), or a KilnError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise KilnError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses the port at once
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise KilnError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a listening socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def head_deadline_protocol(seconds: float, base: type | None = None) -> type:
    """uvicorn's HTTP protocol ``base`` (default: httptools' where installed, else h11's), closing a
    connection whose request head has not arrived in full ``seconds`` after it opened or after the
    previous answer. uvicorn has no such deadline: its keep-alive timer stops at the first byte, so a
    client that sends a head a byte at a time would hold its socket for ever."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadDeadline(base or AutoHTTPProtocol):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            # Whatever cycle is current now is the previous request's: a new head makes a new one.
            self._deadline = self.loop.call_later(seconds, self._expired, self.cycle)

        def _disarm(self) -> None:
            deadline = getattr(self, "_deadline", None)
            if deadline is not None:
                deadline.cancel()
            self._deadline = None

        def _expired(self, previous: Any) -> None:
            self._deadline = None
            if self.cycle is previous and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


def serve(load: Callable[[], Any], settings: ServeSettings, *, name: str, verbose: int = 0) -> None:
    """Serve the model ``load()`` returns until SIGTERM or Ctrl-C; ``name`` (the run) is for the
    start-up line. A model that fails to load ends the server with that error."""
    import uvicorn

    from kiln.serve.app import create_app

    settings.check()
    if not settings.loopback:
        log.warning(f"warning: listening on {settings.host}: every network this machine is on can reach the "
                    f"model{'' if settings.api_key else '; consider --api-key'}")
    sock = listen(settings.host, settings.port)
    url = url_of(sock)
    failure: list[BaseException] = []

    def on_ready(state: Any) -> None:
        if state.error is not None:
            failure.append(state.error)
            server.should_exit = True
            return
        info = state.info
        log.info(f"serving {name} ({info['task']}, {info['device']}, {info['precision']}) at {url}/predict; "
                 f"API docs {url}/docs, demo {url}/ (loaded in {state.loaded_in:.1f}s; Ctrl-C to stop)")

    app = create_app(load, settings, on_ready=on_ready)
    # A connection cap (uvicorn answers 503 past it), a short keep-alive and a deadline for each
    # request head: idle or slow clients cannot hold every socket.
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=bool(verbose),
                            timeout_graceful_shutdown=GRACEFUL_SECONDS, lifespan="on",
                            limit_concurrency=settings.max_connections, timeout_keep_alive=5,
                            http=head_deadline_protocol(settings.read_timeout_s))
    server = uvicorn.Server(config)
    # uvicorn raises SIGTERM again after its graceful shutdown, for the default action (exit 143);
    # a drained server has done what SIGTERM asks, so kiln exits 0 instead.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if failure:
        error = failure[0]
        raise error if isinstance(error, (KilnError, OSError)) else KilnError(f"loading failed: {error}")
