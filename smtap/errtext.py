"""Readable text for any exception or wire value, for error messages: never a Python
repr or a class name (shared by the SM framework and the local toolstack)."""


def describe(e):
    """XenAPI failures are their error code and parameters, OS errors their text and
    path, a KeyError the missing key."""
    details = getattr(e, "details", None)
    if isinstance(details, (list, tuple)) and details:
        return " ".join(str(d) for d in details)
    if isinstance(e, EnvironmentError) and e.strerror:
        return "%s: %s" % (e.strerror, e.filename) if e.filename else e.strerror
    if isinstance(e, KeyError) and e.args:
        return "missing %s" % e.args[0]
    text = str(e)
    return text if text else "unexpected error without a message"


def value_text(value):
    """An XML-RPC value as text: a struct as key=value pairs, an array comma-separated."""
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s=%s" % (k, value_text(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return "[%s]" % ", ".join(value_text(v) for v in value)
    return "" if value is None else str(value)


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def one_line(text):
    """text for a one-line message: control characters (a newline in a file name read
    from a corrupt image) escaped as \\n, \\xNN."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c):
    if c in _ESCAPES:
        return _ESCAPES[c]
    return "\\x%02x" % ord(c) if ord(c) < 256 else "\\u%04x" % ord(c)
