"""Demo backend for the standalone example: says which pod answered and whom it saw.

HTTP on --http-port over IPv4 and IPv6 (every GET answers one line) and a
UDP echo on --udp-port that prefixes the pod name. Standard library only, so it runs in
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
            client = self.client_address[0].removeprefix("::ffff:")  # an IPv4 client on the dual-stack socket
            body = f"hello from {args.name} (you came from {client})\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *rest: object) -> None:
            pass

    class DualStackServer(ThreadingHTTPServer):
        address_family = socket.AF_INET6

        def server_bind(self) -> None:
            # One socket for both families (the dual-stack demo service reaches the pod over IPv6).
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    threading.Thread(target=serve_udp, args=(args.name, args.udp_port), daemon=True).start()
    DualStackServer(("::", args.http_port), Handler).serve_forever()


if __name__ == "__main__":
    main()
