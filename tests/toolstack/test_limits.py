"""Request size: XAPI's limit (http_limit_max_rpc_size, 300 KiB). A larger body is
answered 413 without being kept (the server's memory stays flat) and the server goes on
serving. Failed before: a 96 MiB body was read and parsed whole (RSS 747 MiB)."""
import gzip
import socket
import xmlrpc.client

from smtap import settings
from lib.procs import memory_of
from lib.sizes import MiB

LIMIT = 300 * 1024


def post(headers, body_chunks):
    """One POST on a fresh connection; (status line, response body)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(settings.xapi_socket())
    try:
        s.sendall(("POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\n%s\r\n"
                   % "".join("%s: %s\r\n" % kv for kv in headers.items())).encode())
        for chunk in body_chunks:
            s.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            assert more, "connection closed without an answer"
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int([line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")][0])
        while len(rest) < length:
            more = s.recv(65536)
            if not more:
                break
            rest += more
        return head.split(b"\r\n")[0].decode(), rest.decode()
    finally:
        s.close()


def login_call(password):
    return xmlrpc.client.dumps(("root", password), "session.login_with_password").encode()


def test_oversized_requests_are_refused_with_flat_memory(host):
    host.start()
    pid = host.proc.pid
    small = login_call("x" * (LIMIT - 1024))              # just under the limit: served
    assert len(small) <= LIMIT
    status, body = post({"Content-Length": len(small)}, [small])
    assert status.split()[1] == "200" and "Success" in body

    before = memory_of(pid)["VmRSS"] // 1024
    chunk = b"<value>" + b"x" * (MiB - 7)
    status, body = post({"Content-Length": 96 * MiB}, [chunk] * 96)
    assert status.split()[1] == "413", status
    assert "over the limit of %d bytes" % LIMIT in body
    gz = gzip.compress(login_call("y" * 64 * MiB))         # small on the wire, 64 MiB inside
    assert len(gz) < LIMIT
    status, body = post({"Content-Length": len(gz), "Content-Encoding": "gzip"}, [gz])
    assert status.split()[1] == "413", status
    assert memory_of(pid)["VmRSS"] // 1024 - before < 20 * 1024, (before, memory_of(pid)["VmRSS"] // 1024)

    status, body = post({}, [])                            # no length: refused too
    assert status.split()[1] == "411"
    x = host.session().xenapi                              # and the server lives
    assert x.host.get_all()
