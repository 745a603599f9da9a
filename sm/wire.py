"""The argv/stdout wire format: one XML-RPC methodCall in, one methodResponse out.

xmlrpc.client already reads XAPI's terse encoding (untyped <value>text</value>
strings, <value/> for "", no prolog).
"""
import xmlrpc.client
from xml.parsers.expat import ExpatError

from smtap.sm import errors

Fault = xmlrpc.client.Fault


def decode_call(text):
    """methodCall text -> (method name, the single struct parameter)."""
    try:
        params, method = xmlrpc.client.loads(text)
    except (ExpatError, ValueError, TypeError, IndexError) as e:
        raise errors.error("BadRequest", "unparsable XML-RPC request: %s" % e)
    if not method:
        raise errors.error("BadRequest", "not a methodCall")
    if len(params) != 1 or not isinstance(params[0], dict):
        raise errors.error("BadRequest", "%s: expected one struct parameter, got %d parameters"
                           % (method, len(params)))
    return method, params[0]


def encode_result(value):
    return xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True)


def encode_fault(code, message):
    return xmlrpc.client.dumps(Fault(code, message), methodresponse=True, allow_none=True)


def encode_call(method, params):
    """A methodCall (vdi_generate_config returns one)."""
    return xmlrpc.client.dumps((params,), method, allow_none=True)
