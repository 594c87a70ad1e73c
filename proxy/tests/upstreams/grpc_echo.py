"""A gRPC test server and client (grpcio, generic handlers on raw bytes, no generated stubs).

usage: grpc_echo.py serve LISTEN_ADDR [CERT KEY]     (TLS when CERT and KEY are given)
       grpc_echo.py call TARGET                      (plain-text HTTP/2 to TARGET)

Methods of the service `test.Echo`:
  Unary         answers the request reversed, with trailing metadata x-echo-trailer: done
  Stream        answers the request, then request + "-1" ... request + "-4" (server streaming)
  Bidi          answers each message upper-cased (bidirectional streaming)
  Fail          ends with status NOT_FOUND and details "no such thing"
`call` runs each once and prints the results as one JSON object.
"""

import json
import sys
from concurrent import futures

import grpc


def unary(request, context):
    context.set_trailing_metadata((("x-echo-trailer", "done"),))
    return request[::-1]


def stream(request, context):
    yield request
    for i in range(1, 5):
        yield request + b"-%d" % i


def bidi(requests, context):
    for r in requests:
        yield r.upper()


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def serve(listen, cert=None, key=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    if cert:
        with open(cert, "rb") as c, open(key, "rb") as k:
            creds = grpc.ssl_server_credentials(((k.read(), c.read()),))
        server.add_secure_port(listen, creds)
    else:
        server.add_insecure_port(listen)
    server.start()
    server.wait_for_termination()


def call(target):
    out = {}
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        unary_call = channel.unary_unary("/test.Echo/Unary")
        reply, c = unary_call.with_call(b"hello", timeout=10)
        out["unary"] = reply.decode()
        out["unary_code"] = c.code().name
        out["unary_trailers"] = dict(c.trailing_metadata())

        replies = channel.unary_stream("/test.Echo/Stream")(b"tick", timeout=10)
        out["stream"] = [r.decode() for r in replies]
        out["stream_code"] = replies.code().name

        bidi_call = channel.stream_stream("/test.Echo/Bidi")
        out["bidi"] = [r.decode() for r in bidi_call(iter([b"a", b"bc", b"def"]), timeout=10)]

        try:
            channel.unary_unary("/test.Echo/Fail")(b"x", timeout=10)
            out["fail_code"] = "OK"
        except grpc.RpcError as e:
            out["fail_code"] = e.code().name
            out["fail_details"] = e.details()
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*sys.argv[2:])
    else:
        call(sys.argv[2])
