"""SR errors: the codes of XE_SR_ERRORCODES.xml and the exception that carries them.

A driver raises errors.raise_error("SRNoSpace", opterr="need 1 GiB") (or
errors.SROSError(44, "...")); the dispatcher turns it into the XML-RPC fault XAPI
expects: Fault(code, "<description> [opterr=<detail>]").
"""
import os

from smtap.errtext import describe  # noqa: F401  (errors.describe for drivers)

TABLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "XE_SR_ERRORCODES.xml")

_table = None  # name -> (code, description), read once per process


def table():
    global _table
    if _table is None:
        # here, not at import: most driver runs raise no error
        from xml.etree import ElementTree
        root = ElementTree.parse(TABLE_FILE).getroot()
        _table = {}
        for node in root.iter("code"):
            _table[node.findtext("name").strip()] = (
                int(node.findtext("value")), node.findtext("description").strip())
    return _table


def description_of(code):
    for number, description in table().values():
        if number == code:
            return description
    return None


def format_message(description, opterr=None):
    if opterr is None or opterr == "":
        return description
    return "%s [opterr=%s]" % (description, opterr)


class SROSError(Exception):
    """An SR error with its code; str() is the fault string XAPI shows."""

    def __init__(self, code, opterr=None):
        self.code = int(code)
        self.opterr = opterr
        self.description = description_of(self.code) or "SR backend error %d" % self.code
        self.message = format_message(self.description, opterr)
        Exception.__init__(self, self.message)


def error(name, opterr=None):
    """The SROSError for a table name; an unknown name is a driver bug, reported as such."""
    try:
        code = table()[name][0]
    except KeyError:
        return SROSError(table()["SMGeneral"][0],
                         "unknown error name %s%s" % (name, ": %s" % opterr if opterr else ""))
    return SROSError(code, opterr)


def raise_error(name, opterr=None):
    raise error(name, opterr)


def code_of(name):
    return table()[name][0]
