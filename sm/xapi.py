"""XenAPI sessions for drivers: the real XenAPI client on the local XAPI unix socket.

XenAPI.xapi_local() derives the socket path from the URL host (with "_" read as "/"),
which breaks under an SMTAP_ROOT containing "_"; this transport connects to an
explicit path instead. A driver reuses the session XAPI handed it (no login) and tags
its calls as subtasks of XAPI's task with the Subtask-of header.
"""
import http.client
import os
import socket
import xmlrpc.client

import XenAPI

from smtap import settings

Failure = XenAPI.Failure


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        http.client.HTTPConnection.__init__(self, "localhost")
        self.path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over HTTP on a unix socket at `path`, adding `headers` to each request."""

    def __init__(self, path, headers=None):
        xmlrpc.client.Transport.__init__(self)
        self.path = path
        self.headers = list((headers or {}).items())

    def make_connection(self, host):
        if self._connection and self._connection[0] == host:
            return self._connection[1]
        self._connection = host, _UnixHTTPConnection(self.path)
        return self._connection[1]

    def send_headers(self, connection, headers):
        xmlrpc.client.Transport.send_headers(self, connection, list(headers) + self.headers)


def session(session_ref, subtask_of=None, path=None):
    """A XenAPI.Session reusing `session_ref` on the local socket (settings.xapi_socket())."""
    headers = {}
    if subtask_of:
        headers["Subtask-of"] = subtask_of
    if os.environ.get("ORIGINATOR"):  # as XenAPI's own transport does
        headers["originator"] = os.environ["ORIGINATOR"]
    transport = UnixTransport(path or settings.xapi_socket(), headers)
    s = XenAPI.Session("http://localhost/", transport=transport)
    s._session = session_ref  # the documented way to adopt a session XAPI created
    return s
