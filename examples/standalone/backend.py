"""Demo backend for the standalone example: says which pod answered and whom it saw.

HTTP on --http-port (every GET answers one line) and a UDP echo on
--udp-port that prefixes the pod name. Standard library only, so it runs in
any pod namespace without the project's virtual environment.
"""

from __future__ import annotations

import argparse
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_udp(name: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(f"{name}: ".encode() + data[:1024], peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--udp-port", type=int, default=5353)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"hello from {args.name} (you came from {self.client_address[0]})\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *rest: object) -> None:
            pass

    threading.Thread(target=serve_udp, args=(args.name, args.udp_port), daemon=True).start()
    ThreadingHTTPServer(("0.0.0.0", args.http_port), Handler).serve_forever()


if __name__ == "__main__":
    main()
