"""Development server: ``python -m ingress --host 127.0.0.1 --port 8080``.

Threaded Werkzeug server, settings from the environment (:mod:`ingress.config`).
Its per-request access log is silenced (it would print client addresses); the
app logs each request itself, without them. On SIGTERM/SIGINT the publisher is
flushed before exit. Production runs gunicorn (:mod:`ingress.gunicorn_conf`).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Optional

from werkzeug.serving import WSGIRequestHandler, make_server

from ingress import ConfigError, create_app, shutdown


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):  # the app logs requests without client addresses
        pass

    def log_error(self, *args):  # Werkzeug includes the client address; nothing useful to keep
        pass


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    try:
        app = create_app()
    except ConfigError as exc:
        print(json.dumps({"level": "error", "msg": "invalid configuration", "detail": str(exc)}), file=sys.stderr)
        return 2
    server = make_server(args.host, args.port, app, threaded=True, request_handler=_QuietHandler)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps({"level": "info", "msg": "listening", "host": args.host, "port": server.port}),
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        shutdown(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
