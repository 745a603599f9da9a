"""get_all_records_where: XAPI's filter language (db_filter_lex.mll / db_filter_parse.mly),
its precedence, and columns compared as XAPI's database stores them."""
import pytest

from smtap.toolstack import dbfilter
from lib.sizes import GiB
from lib.toolstack import failure


def evaluate(text, row=None):
    return dbfilter.evaluate(dbfilter.parse(text), (row or {}).__getitem__)


@pytest.mark.parametrize("text,expected", [
    ('"a" = "a"', True),
    ('"a"="b"', False),
    ('true', True), ('false', False), ('(((true)))', True),
    # no space needed between tokens: upstream SR.from_uuid's "... andfield ..."
    ('field "SR" = "r1" andfield "host" = "h1"', True),
    ('field "SR"="r1"andfield"host"="h2"', False),
    ('true orfalse', True), ('nottrue', False),
    # "and" and "or" bind equally, left to right
    ('true or false and false', False),     # (true or false) and false
    ('false and true or true', True),       # (false and true) or true
    # "not" binds loosest: it takes everything to its right
    ('not true and false', True),           # not (true and false)
    ('not false or true', False),           # not (false or true)
    ('true and not false or true', False),  # true and not (false or true)
    ('(not true) or true', True),
    # no escapes: a backslash is a character, a quote ends the string
    ('"a\\" = "a\\"', True),
    ('field "name" = "x y\t\n"', True),
])
def test_language(text, expected):
    assert evaluate(text, {"SR": "r1", "host": "h1", "name": "x y\t\n"}) is expected


@pytest.mark.parametrize("text,message", [
    ('TRUE', dbfilter.LEX_ERROR),                      # keywords are lower case
    ('field "a" = "b" AND true', dbfilter.LEX_ERROR),
    ('"unterminated = "x', dbfilter.LEX_ERROR),
    ('"a" = "b" & true', dbfilter.LEX_ERROR),
    ('', dbfilter.PARSE_ERROR),
    ('"a"', dbfilter.PARSE_ERROR),
    ('"a" = "b" = "c"', dbfilter.PARSE_ERROR),
    ('true = true', dbfilter.PARSE_ERROR),
    ('field field "a" = "b"', dbfilter.PARSE_ERROR),
    ('(true', dbfilter.PARSE_ERROR), ('true)', dbfilter.PARSE_ERROR),
    ('not', dbfilter.PARSE_ERROR), ('true and', dbfilter.PARSE_ERROR),
])
def test_malformed(text, message):
    with pytest.raises(dbfilter.FilterSyntaxError) as e:
        dbfilter.parse(text)
    assert str(e.value) == message


def test_columns_are_only_looked_up_when_compared():
    looked = []
    row = {"a": "1"}

    def column(name):
        looked.append(name)
        return row[name]
    assert dbfilter.evaluate(dbfilter.parse('field "a" = "2" and field "nope" = "x"'),
                             column) is False
    assert looked == ["a"]


def test_through_the_api(xapi):
    """Upstream sm's own filters, on the toolstack's records."""
    host = xapi.host.get_all()[0]
    sr = xapi.SR.create(host, {}, "0", "the sr", "", "dummy", "user", False, {})
    (pbd,) = xapi.SR.get_PBDs(sr)
    # SR.from_uuid (upstream drivers/SR.py) builds this one without a space
    where = 'field "SR" = "%s" and' % sr + 'field "host" = "%s"' % host
    assert list(xapi.PBD.get_all_records_where(where)) == [pbd]
    vdi = xapi.VDI.create({"SR": sr, "virtual_size": str(GiB), "name_label": "disk",
                           "type": "user", "sharable": False, "read_only": False,
                           "other_config": {"k": "v"}, "sm_config": {}, "tags": ["t1"]})
    assert list(xapi.VDI.get_all_records_where('field "SR" = "%s"' % sr)) == [vdi]
    # namespaced fields are stored as name__label; booleans, numbers and maps as text
    assert list(xapi.VDI.get_all_records_where('field "name__label" = "disk"')) == [vdi]
    assert list(xapi.VDI.get_all_records_where(
        'field "managed" = "true" and field "virtual_size" = "%d"' % GiB)) == [vdi]
    assert list(xapi.VDI.get_all_records_where(
        'field "other_config" = "((\'k\' \'v\'))"')) == [vdi]
    assert list(xapi.SR.get_all_records_where('field "VDIs" = "(\'%s\')"' % vdi)) == [sr]
    assert list(xapi.SR.get_all_records_where('field "local_cache_enabled" = "true"')) == []
    assert list(xapi.VDI.get_all_records_where('not field "SR" = "%s"' % sr)) == []
    assert list(xapi.SM.get_all_records_where('field "type" = "dummy"'))
    # the wire name of a namespaced field is no column; XAPI fails once a row is compared
    assert failure(xapi.VDI.get_all_records_where, 'field "name_label" = "disk"') == [
        "INTERNAL_ERROR", "missing field", "name_label", ""]
    assert xapi.message.get_all_records_where('field "nope" = "x"') == {}   # no rows
    assert failure(xapi.VDI.get_all_records_where, 'field "SR" = ') == [
        "INVALID_VALUE", 'field "SR" = ', dbfilter.PARSE_ERROR]
    assert failure(xapi.VDI.get_all_records_where, 'FIELD "SR" = "x"') == [
        "INVALID_VALUE", 'FIELD "SR" = "x"', dbfilter.LEX_ERROR]
