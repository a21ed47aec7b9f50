"""Run the app under uvicorn in a background thread (tests, benchmarks, notebooks).

:class:`BackgroundServer` binds a socket itself (port 0 picks a free port, so parallel test runs
never collide), starts ``uvicorn.Server`` on it in a daemon thread with the lifespan on (the
scheduler starts and stops with it), waits until it accepts connections, and shuts it down
gracefully on :meth:`BackgroundServer.stop` or when used as a context manager.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from taskmoe.serving import require_serve_extra


class BackgroundServer:
    """``with BackgroundServer(app) as srv: openai.OpenAI(base_url=srv.url + "/v1", ...)``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        require_serve_extra()
        import uvicorn

        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        from taskmoe.serving.serve import KEEP_ALIVE_S

        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                                timeout_keep_alive=KEEP_ALIVE_S)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"taskmoe-server-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} exited during startup")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server on {self.url} did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
