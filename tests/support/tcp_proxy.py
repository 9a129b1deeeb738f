"""A TCP proxy on loopback that can cut every connection, refuse new ones, and recover.

Used to put a "network" between the gateway and PostgreSQL: ``cut()`` closes every relayed
connection and the listening socket (new connections are refused), ``restore()`` listens on the
same port again.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.servers import bind_loopback

_CHUNK = 65536


class TcpProxy:
    """Relays 127.0.0.1:``port`` to ``target_host``:``target_port``, one thread per direction."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = bind_loopback(port)
        self.port: int = self._listener.getsockname()[1]
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.accepted = 0
        self.cuts = 0

    def start(self) -> TcpProxy:
        self._acceptor.start()
        return self

    @property
    def connections(self) -> int:
        """Connections being relayed now."""
        with self._lock:
            return len(self._pairs)

    @property
    def is_cut(self) -> bool:
        with self._lock:
            return self._listener is None

    def cut(self) -> None:
        """Drop every connection and stop listening: new connections are refused."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, set()
            self.cuts += 1
        if listener is not None:
            listener.close()
        for pair in pairs:
            _close_pair(pair)

    def restore(self) -> None:
        """Listen on the same port again."""
        with self._lock:
            if self._listener is None:
                self._listener = bind_loopback(self.port)

    def close(self) -> None:
        self._stopped.set()
        self.cut()
        self._acceptor.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                self._stopped.wait(0.02)
                continue
            try:
                listener.settimeout(0.05)
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by cut()
                continue
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        client.settimeout(None)
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        with self._lock:
            if self._listener is None:  # cut while connecting
                _close_pair(pair)
                return
            self._pairs.add(pair)
            self.accepted += 1
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(pair, source, sink), daemon=True).start()

    def _pump(
        self,
        pair: tuple[socket.socket, socket.socket],
        source: socket.socket,
        sink: socket.socket,
    ) -> None:
        try:
            while data := source.recv(_CHUNK):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._pairs.discard(pair)
        _close_pair(pair)


def _close_pair(pair: tuple[socket.socket, socket.socket]) -> None:
    for sock in pair:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
