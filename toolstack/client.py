"""A XenAPI session to a toolstack socket given by path.

XenAPI.xapi_local() derives the socket path from the URL host ("_" -> "/"), which breaks
for roots whose path holds "_"; this transport takes the path itself and otherwise is
XenAPI's own UDSTransport.
"""
import http.client
import socket

import XenAPI

from smtap import settings


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        http.client.HTTPConnection.__init__(self, "localhost")
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


class UnixTransport(XenAPI.UDSTransport):
    def __init__(self, path):
        XenAPI.UDSTransport.__init__(self)
        self.socket_path = path

    def make_connection(self, host):
        self._extra_headers = []
        self.with_originator()
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        self._connection = host, _UnixConnection(self.socket_path)
        return self._connection[1]


def session(path=None):
    """An unauthenticated XenAPI.Session on the toolstack socket (default: this root's)."""
    transport = UnixTransport(path or settings.xapi_socket())
    return XenAPI.Session("http://localhost/", transport=transport)


def login(path=None, originator="smtap"):
    s = session(path)
    s.xenapi.login_with_password("root", "", "1.0", originator)
    return s
