"""An HTTPS/1.1 test backend (Python's ssl): answers every request with what it saw of the TLS
connection, as JSON: the SNI name, the client certificate's common name, the path and a
connection number (to tell new connections from reused ones).

usage: https_backend.py LISTEN_ADDR CERT KEY [CLIENT_CA]
With CLIENT_CA, a client certificate signed by it is required.
"""

import http.server
import itertools
import json
import socketserver
import ssl
import sys

host, port = sys.argv[1].rsplit(":", 1)
cert, key = sys.argv[2], sys.argv[3]
client_ca = sys.argv[4] if len(sys.argv) > 4 else None

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
if client_ca:
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_ca)

# The SNI each TLS connection sent (None when it sent none), by connection object.
sni_seen = {}


def on_sni(sslobj, name, _ctx):
    sni_seen[id(sslobj)] = name


ctx.sni_callback = on_sni
numbers = itertools.count(1)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.number = next(numbers)

    def do_GET(self):
        peer = self.request.getpeercert()
        cn = None
        if peer:
            for rdn in peer.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        cn = v
        body = json.dumps(
            {
                "sni": sni_seen.get(id(self.request)),
                "client_cn": cn,
                "path": self.path,
                "connection": self.number,
                "alpn": self.request.selected_alpn_protocol(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def get_request(self):
        sock, addr = self.socket.accept()
        # The handshake runs in the handler's thread (setup), so a failed one does not stall
        # the accept loop.
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def process_request_thread(self, request, client_address):
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def handle_error(self, request, client_address):
        pass


Server((host, int(port)), Handler).serve_forever()
