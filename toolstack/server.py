"""smtap-xapi: the local XenAPI server (XML-RPC over HTTP/1.1 on a unix socket).

Threaded: drivers call back into the server while the request that ran them waits.
Start-up binds the socket first and discovers drivers in the background; calls that
need a driver wait for discovery to finish.
"""
import argparse
import gzip
import io
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import xml.parsers.expat
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

from smtap import settings
from smtap.toolstack import discovery, domains, errors, inventory, templates
from smtap.toolstack.classes import host as host_class
from smtap.toolstack.classes import vbd as vbd_class
from smtap.toolstack.context import Context, Toolstack
from smtap.toolstack.db import Database
from smtap.toolstack.dispatch import dispatch, failure
from smtap.toolstack.objects import Store

log = logging.getLogger("smtap.xapi")


def db_path():
    return os.path.join(settings.state_dir(), "xapi.db")


def pid_path():
    return os.path.join(settings.state_dir(), "smtap-xapi.pid")


def log_path():
    return os.path.join(settings.state_dir(), "smtap-xapi.log")


# XAPI's http_limit_max_rpc_size: a larger body is refused before it is read.
MAX_REQUEST = 300 * 1024
DRAIN_LIMIT = 1 << 30       # what a refused request may still send, read and dropped
DRAIN_TIMEOUT = 30


class RequestHandler(SimpleXMLRPCRequestHandler):
    protocol_version = "HTTP/1.1"     # keep-alive, as XenAPI's transport expects
    rpc_paths = ()                    # XAPI answers on any path
    disable_nagle_algorithm = False   # a TCP option: not on a unix socket

    def address_string(self):
        return "unix"

    def do_POST(self):
        try:
            length = int(self.headers.get("content-length"))
        except (TypeError, ValueError):
            length = -1
        if length < 0:
            return self._refuse(411, "Length Required", "a Content-Length header is required")
        if length > MAX_REQUEST:
            log.warning("refused a %d-byte request (limit %d)", length, MAX_REQUEST)
            self._refuse(413, "Request Entity Too Large",
                         "request body of %d bytes is over the limit of %d bytes"
                         % (length, MAX_REQUEST))
            return self._drain(length)
        return SimpleXMLRPCRequestHandler.do_POST(self)

    def _refuse(self, code, reason, text):
        body = (text + "\n").encode()
        self.send_response(code, reason)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def _drain(self, length):
        """Read and drop what the client still sends (clients read the answer only once
        their request is written), in small pieces: memory stays flat."""
        self.connection.settimeout(DRAIN_TIMEOUT)
        left = min(length, DRAIN_LIMIT)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def decode_request_content(self, data):
        """gzip bodies too are held to the limit, decompressed."""
        if self.headers.get("content-encoding", "identity").lower() != "gzip":
            return SimpleXMLRPCRequestHandler.decode_request_content(self, data)
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                decoded = f.read(MAX_REQUEST + 1)
        except (OSError, EOFError):
            return self._refuse(400, "Bad Request", "the gzip body does not decompress")
        if len(decoded) > MAX_REQUEST:
            return self._refuse(413, "Request Entity Too Large",
                                "gzip body over the limit of %d bytes" % MAX_REQUEST)
        return decoded

    def log_message(self, fmt, *args):
        log.debug(fmt, *args)


class Server(socketserver.ThreadingUnixStreamServer, SimpleXMLRPCDispatcher):
    daemon_threads = True
    logRequests = False               # read by SimpleXMLRPCRequestHandler

    def __init__(self, path, ts):
        self.ts = ts
        SimpleXMLRPCDispatcher.__init__(self, allow_none=True, encoding=None)
        socketserver.ThreadingUnixStreamServer.__init__(self, path, RequestHandler)

    def _marshaled_dispatch(self, data, dispatch_method=None, path=None):
        """Every answer is an envelope, even to a request that does not parse."""
        try:
            params, method = xmlrpc.client.loads(data)
            if method is None:
                raise ValueError("not a methodCall")
        except (xml.parsers.expat.ExpatError, ValueError, TypeError, IndexError,
                xmlrpc.client.ResponseError) as e:
            response = failure(errors.XMLRPC_UNMARSHAL_FAILURE, str(e))
        else:
            response = dispatch(self.ts, method, params)
        try:
            body = xmlrpc.client.dumps((response,), methodresponse=True, allow_none=True)
        except (TypeError, OverflowError) as e:
            log.exception("cannot marshal the result of %s", method)
            body = xmlrpc.client.dumps((failure(errors.INTERNAL_ERROR, str(e)),),
                                       methodresponse=True)
        return body.encode("utf-8")


def socket_in_use(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def start():
    """Open the database, bootstrap this host, bind the socket, discover in background."""
    path = settings.xapi_socket()
    if socket_in_use(path):
        raise RuntimeError("a toolstack is already serving %s" % path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ts = Toolstack(Store(Database(db_path())))
    host_class.bootstrap(ts, *inventory.ensure())
    templates.ensure(ts)
    server = Server(path, ts)

    def discover():
        try:
            drivers = discovery.discover(ts.host)
            discovery.sync_sm_records(ts.store, drivers)
            ts.drivers = drivers
            log.info("drivers: %s", " ".join(sorted(drivers)) or "none")
        except Exception:
            log.exception("driver discovery failed")
        finally:
            ts.drivers_ready.set()
        try:
            domains.resync(Context(ts))        # guests first: their VBDs are the VDIs' users
        except Exception:
            log.exception("start-up resync of the guests failed")
        try:
            vbd_class.resync(Context(ts))
        except Exception:
            log.exception("start-up resync failed")
        finally:
            ts.ready.set()
    threading.Thread(target=discover, name="discovery", daemon=True).start()
    return server


def serve(server):
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with open(pid_path(), "w") as f:
        f.write("%d\n" % os.getpid())
    try:
        server.serve_forever(poll_interval=0.1)   # quick to stop: tests start many
    finally:
        server.server_close()
        for path in (settings.xapi_socket(), pid_path()):
            try:
                os.unlink(path)
            except OSError:
                pass
        server.ts.store.db.close()
        log.info("stopped")


def daemonize():
    """Fork; the parent exits 0 once the child serves (or 1 with its error)."""
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            status = r.read()
        if status != "ok":
            sys.stderr.write("smtap-xapi: %s\n" % (status or "failed to start"))
            return 1
        return 0
    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    logfd = os.open(log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    with os.fdopen(write_fd, "w") as w:
        try:
            server = start()
        except Exception as e:
            w.write(str(e))
            w.flush()
            os._exit(1)
        w.write("ok")
    serve(server)
    os._exit(0)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="smtap-xapi", description=__doc__.splitlines()[0])
    parser.add_argument("--daemon", action="store_true",
                        help="run in the background (pid file and log in the state dir)")
    parser.add_argument("--debug", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    os.makedirs(settings.state_dir(), exist_ok=True)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s[%(thread)d] %(levelname)s %(message)s")
    if args.daemon:
        return daemonize()
    try:
        server = start()
    except (RuntimeError, OSError) as e:
        sys.stderr.write("smtap-xapi: %s\n" % e)
        return 1
    log.info("serving %s", settings.xapi_socket())
    serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
