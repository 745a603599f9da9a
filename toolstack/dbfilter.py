"""get_all_records_where's expression language, parsed and evaluated as XAPI's database
does it (xen-api ocaml/database: db_filter_lex.mll, db_filter_parse.mly, db_filter.ml).

    expr  := value "=" value | expr "and" expr | expr "or" expr | "not" expr
           | "true" | "false" | "(" expr ")"
    value := "<literal>" | field "<column>"

The lexer needs no space between tokens (`... = "x" andfield "y" = ...` is two terms:
upstream sm's SR.from_uuid sends exactly that) and keywords are lower case only. A
string is everything between two double quotes: there is no escape, so a literal cannot
hold a double quote and a backslash is an ordinary character. Precedence is yacc's for
`%right LNOT %left LAND LOR`: "and" and "or" bind equally, left to right
(`a or b and c` is `(a or b) and c`), and "not" binds loosest, taking everything to its
right up to a closing parenthesis (`not a and b` is `not (a and b)`).

A column is compared as the database stores it: strings as they are, booleans
"true"/"false", numbers in decimal, sets and maps as XAPI's S-expressions.
"""

# ocamllex's messages, as XAPI returns them in INVALID_VALUE [expr; message].
LEX_ERROR = 'Failure("lexing: empty token")'
PARSE_ERROR = "Stdlib.Parsing.Parse_error"

# Token kinds, named as in db_filter_parse.mly; a keyword's text -> its kind.
EQ, LPAREN, RPAREN, IDENT, EOF = "EQ", "LPAREN", "RPAREN", "IDENT", "EOF"
TRUE, FALSE, FIELD, LAND, LOR, LNOT = "TRUE", "FALSE", "FIELD", "LAND", "LOR", "LNOT"
KEYWORDS = (("true", TRUE), ("false", FALSE), ("field", FIELD), ("and", LAND), ("or", LOR),
            ("not", LNOT))
PUNCTUATION = {"=": EQ, "(": LPAREN, ")": RPAREN}
_BLANKS = " \t\n"


class FilterSyntaxError(Exception):
    """The expression is not in the language; str() is XAPI's message."""


def _lex(text):
    """Tokens (kind, text), produced as the parser asks for them (as ocamllex does: a
    bad character after a parse error is never reached)."""
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _BLANKS:
            i += 1
        if i == n:
            yield EOF, ""
            return
        c = text[i]
        if c in PUNCTUATION:
            i += 1
            yield PUNCTUATION[c], c
            continue
        if c == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise FilterSyntaxError(LEX_ERROR)
            yield IDENT, text[i + 1:end]
            i = end + 1
            continue
        for word, kind in KEYWORDS:
            if text.startswith(word, i):
                i += len(word)
                yield kind, word
                break
        else:
            raise FilterSyntaxError(LEX_ERROR)


class _Parser(object):
    def __init__(self, text):
        self.tokens = _lex(text)
        self.kind, self.text = next(self.tokens)

    def advance(self):
        taken = self.text
        if self.kind != EOF:
            self.kind, self.text = next(self.tokens)
        return taken

    def expect(self, kind):
        if self.kind != kind:
            raise FilterSyntaxError(PARSE_ERROR)
        return self.advance()

    def expr(self):
        left = self.unary()
        while self.kind in (LAND, LOR):
            op = self.kind
            self.advance()
            left = (op, left, self.unary())
        return left

    def unary(self):
        if self.kind == LNOT:
            self.advance()
            return (LNOT, self.expr())
        if self.kind in (TRUE, FALSE):
            kind = self.kind
            self.advance()
            return (kind,)
        if self.kind == LPAREN:
            self.advance()
            inner = self.expr()
            self.expect(RPAREN)
            return inner
        left = self.value()
        self.expect(EQ)
        return (EQ, left, self.value())

    def value(self):
        if self.kind == FIELD:
            self.advance()
            return (FIELD, self.expect(IDENT))
        return (IDENT, self.expect(IDENT))


def parse(text):
    """The expression's tree; FilterSyntaxError if it is not one."""
    parser = _Parser(text)
    tree = parser.expr()
    parser.expect(EOF)
    return tree


def evaluate(tree, column):
    """Whether a row matches; column(name) is the row's stored text of a column (it
    raises for an unknown one). Evaluated lazily, left to right, as XAPI does: a column
    named only behind a short-circuited branch is never looked up."""
    op = tree[0]
    if op == TRUE:
        return True
    if op == FALSE:
        return False
    if op == LNOT:
        return not evaluate(tree[1], column)
    if op == LAND:
        return evaluate(tree[1], column) and evaluate(tree[2], column)
    if op == LOR:
        return evaluate(tree[1], column) or evaluate(tree[2], column)
    return _value(tree[1], column) == _value(tree[2], column)


def _value(value, column):
    kind, text = value
    return column(text) if kind == FIELD else text


# --- the database's text of a value (Schema.Value.marshal) ------------------------------
def _sexp_string(text):
    return "'%s'" % text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")


def stored_set(items):
    return "(%s)" % " ".join(_sexp_string(str(v)) for v in items)


def stored_map(pairs):
    return "(%s)" % " ".join("(%s %s)" % (_sexp_string(str(k)), _sexp_string(str(v)))
                             for k, v in pairs.items())
