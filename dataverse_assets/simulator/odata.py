"""Parser and evaluator for the OData query options the simulator understands.

Covers `$select`, `$orderby` and `$filter` the way the Dataverse Web API applies them:
comparisons between one column and one literal, `and`/`or`/`not`, parentheses, and the
`contains`/`startswith`/`endswith` functions. Errors raise `ODataQueryError` with messages
worded like Dataverse's.

Semantics mirror SQL Server behind Dataverse, because that is what a client meets in production:
- strings compare case-insensitively (the default collation is case-insensitive);
- GUIDs compare case-insensitively for `eq`/`ne`, and `gt`/`lt` and ordering follow SQL Server's
  uniqueidentifier order (the last six bytes are the most significant), not string order;
- `null` sorts first ascending; `ne` matches rows where the column is null.

Everything here is a pure function of its arguments: no simulator state.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

QUERY_ERROR_CODE = "0x80060888"

Row = Mapping[str, Any]
Predicate = Callable[[Row], bool]

# Value type -> comparison category; every column in a row falls in one of these. Value types
# are AttributeTypes plus three the metadata spells otherwise: "Date" (a DateTime with DateOnly
# behaviour, Edm.Date on the wire) and "MultiSelectPicklist" and "File" (AttributeType
# Virtual, yet rows carry them).
CATEGORY_BY_TYPE: dict[str, str] = {
    "String": "string",
    "Memo": "string",
    "EntityName": "string",
    "Integer": "int",
    "BigInt": "int",
    "Picklist": "int",
    "State": "int",
    "Status": "int",
    "Decimal": "number",
    "Double": "number",
    "Money": "number",
    "Boolean": "bool",
    "DateTime": "datetime",
    "Date": "date",
    "MultiSelectPicklist": "string",
    "Uniqueidentifier": "guid",
    "File": "guid",
    "Lookup": "guid",
    "Customer": "guid",
    "Owner": "guid",
}

EDM_BY_TYPE: dict[str, str] = {
    "String": "Edm.String",
    "Memo": "Edm.String",
    "EntityName": "Edm.String",
    "Integer": "Edm.Int32",
    "BigInt": "Edm.Int64",
    "Picklist": "Edm.Int32",
    "State": "Edm.Int32",
    "Status": "Edm.Int32",
    "Decimal": "Edm.Decimal",
    "Double": "Edm.Double",
    "Money": "Edm.Decimal",
    "Boolean": "Edm.Boolean",
    "DateTime": "Edm.DateTimeOffset",
    "Date": "Edm.Date",
    "MultiSelectPicklist": "Edm.String",
    "Uniqueidentifier": "Edm.Guid",
    "File": "Edm.Guid",
    "Lookup": "Edm.Guid",
    "Customer": "Edm.Guid",
    "Owner": "Edm.Guid",
}

_OP_KIND = {
    "eq": "Equal",
    "ne": "NotEqual",
    "gt": "GreaterThan",
    "ge": "GreaterThanOrEqual",
    "lt": "LessThan",
    "le": "LessThanOrEqual",
}
_OP_FUNC: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
_FLIPPED = {"eq": "eq", "ne": "ne", "gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}
_FUNCTIONS = ("contains", "startswith", "endswith")

_GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_DATETIME_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?(Z|[+-]\d{2}:\d{2})$", re.IGNORECASE
)
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MIDNIGHT = "T00:00:00Z"  # an Edm.Date compares as this moment of its day
_INT_RE = re.compile(r"^[+-]?\d+$")
_DECIMAL_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?[mMdDfF]?$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ODataQueryError(Exception):
    """A query option Dataverse would reject; carries the error code and HTTP status."""

    def __init__(self, message: str, code: str = QUERY_ERROR_CODE, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


def property_not_found(name: str, type_name: str) -> ODataQueryError:
    """The error Dataverse returns for an unknown column in any query option."""
    return ODataQueryError(
        f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{type_name}'."
    )


# ---------------------------------------------------------------------------------------------
# Value helpers shared with the rest of the simulator
# ---------------------------------------------------------------------------------------------


def guid_order_key(guid: str) -> str:
    """Sort key giving SQL Server's uniqueidentifier order for a lowercase GUID string.

    SQL Server compares the .NET byte layout most-significant first as bytes 10-15, 8-9, 6-7,
    4-5, 0-3; the first three display groups are little-endian in that layout.
    """
    g = guid
    return (
        g[24:36]
        + g[19:23]
        + g[16:18]
        + g[14:16]
        + g[11:13]
        + g[9:11]
        + g[6:8]
        + g[4:6]
        + g[2:4]
        + g[0:2]
    )


def is_guid(text: str) -> bool:
    """True when text is a GUID in the 8-4-4-4-12 form."""
    return bool(_GUID_RE.match(text))


def format_datetime(value: datetime) -> str:
    """Dataverse's wire form of a DateTime column: UTC, whole seconds, trailing Z."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_datetime(text: str) -> datetime:
    """Parse an ISO-8601 datetime (Z, offset or naive-as-UTC) into an aware UTC datetime."""
    value = datetime.fromisoformat(text.strip())
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def sort_value(value: Any, category: str) -> Any:
    """Normalise a non-null column value so Python ordering matches Dataverse ordering."""
    if category == "string":
        return value.casefold()
    if category == "guid":
        return guid_order_key(value.lower())
    return value


# ---------------------------------------------------------------------------------------------
# $select and $orderby
# ---------------------------------------------------------------------------------------------


def parse_select(text: str, columns: Mapping[str, str], type_name: str) -> list[str]:
    """Parse `$select`; returns the requested columns (deduplicated, request order)."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            raise ODataQueryError(f"Syntax error at position {len(text)} in '{text}'.")
        if name == "*":
            return list(columns)
        if name not in columns:
            raise property_not_found(name, type_name)
        if name not in names:
            names.append(name)
    return names


def parse_orderby(text: str, columns: Mapping[str, str], type_name: str) -> list[tuple[str, bool]]:
    """Parse `$orderby`; returns (column, descending) pairs."""
    keys: list[tuple[str, bool]] = []
    position = 0
    for raw in text.split(","):
        parts = raw.split()
        if not parts or len(parts) > 2:
            raise ODataQueryError(f"Syntax error at position {position} in '{text}'.")
        name = parts[0]
        if name not in columns:
            if not _IDENT_RE.match(name):
                raise ODataQueryError(f"Syntax error at position {position} in '{text}'.")
            raise property_not_found(name, type_name)
        direction = parts[1] if len(parts) == 2 else "asc"
        if direction not in ("asc", "desc"):
            raise ODataQueryError(
                f"Syntax error at position {position + raw.find(direction)} in '{text}'."
            )
        if all(existing != name for existing, _ in keys):
            keys.append((name, direction == "desc"))
        position += len(raw) + 1
    return keys


# ---------------------------------------------------------------------------------------------
# $filter: AST
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """`column op literal`; value is normalised for the column's category."""

    column: str
    op: str
    value: Any
    category: str


@dataclass(frozen=True)
class FunctionCall:
    """`contains(column,'text')` and friends; string columns only."""

    name: str
    column: str
    value: str


@dataclass(frozen=True)
class BoolOp:
    """`and` / `or` over two or more operands."""

    op: str
    items: tuple[FilterExpr, ...]


@dataclass(frozen=True)
class Not:
    """`not expr`."""

    item: FilterExpr


FilterExpr = Comparison | FunctionCall | BoolOp | Not


@dataclass(frozen=True)
class _Token:
    kind: str  # "(", ")", ",", "str", "word"
    text: str
    pos: int


@dataclass(frozen=True)
class _Literal:
    kind: str  # string, int, decimal, bool, null, guid, datetime
    value: Any
    edm: str


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "(),":
            tokens.append(_Token(c, c, i))
            i += 1
        elif c == "'":
            start = i
            i += 1
            parts: list[str] = []
            while True:
                j = text.find("'", i)
                if j < 0:
                    # Dataverse reports the position where the lexer ran off the end.
                    raise ODataQueryError(
                        f"There is an unterminated literal at position {n} in '{text}'."
                    )
                parts.append(text[i:j])
                if j + 1 < n and text[j + 1] == "'":
                    parts.append("'")
                    i = j + 2
                    continue
                i = j + 1
                break
            tokens.append(_Token("str", "".join(parts), start))
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in "(),'":
                i += 1
            tokens.append(_Token("word", text[start:i], start))
    return tokens


def _datetime_literal(text: str) -> tuple[str, bool]:
    """Canonical `YYYY-MM-DDTHH:MM:SSZ` (floored to the second) and whether a fraction was cut."""
    if _DATE_RE.match(text):
        text = text + "T00:00:00Z"
    # fromisoformat takes at most 6 fractional digits; OData allows 7.
    match = re.match(r"^(.*\.\d{6})\d(.*)$", text)
    if match:
        text = match.group(1) + match.group(2)
    value = parse_datetime(text.replace("z", "Z"))
    return format_datetime(value), value.microsecond != 0


class _Parser:
    def __init__(self, text: str, columns: Mapping[str, str], type_name: str) -> None:
        self.text = text
        self.columns = columns
        self.type_name = type_name
        self.tokens = _tokenize(text)
        self.pos = 0

    # -- token helpers
    def _peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _error(self, token: _Token | None) -> ODataQueryError:
        if token is None:
            return ODataQueryError(
                f"Expression expected at position {len(self.text)} in '{self.text}'."
            )
        return ODataQueryError(f"Syntax error at position {token.pos} in '{self.text}'.")

    def _next(self) -> _Token:
        token = self._peek()
        if token is None:
            raise self._error(None)
        self.pos += 1
        return token

    def _expect(self, kind: str) -> _Token:
        token = self._peek()
        if kind == ")" and (token is None or token.kind != kind):
            position = len(self.text) if token is None else token.pos
            raise ODataQueryError(
                f"')' or operator expected at position {position} in '{self.text}'."
            )
        if token is None or token.kind != kind:
            raise self._error(token)
        self.pos += 1
        return token

    def _at_word(self, word: str) -> bool:
        token = self._peek()
        return token is not None and token.kind == "word" and token.text == word

    # -- grammar
    def parse(self) -> FilterExpr:
        expr = self._or()
        if self.pos < len(self.tokens):
            raise self._error(self.tokens[self.pos])
        return expr

    def _or(self) -> FilterExpr:
        items = [self._and()]
        while self._at_word("or"):
            self.pos += 1
            items.append(self._and())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def _and(self) -> FilterExpr:
        items = [self._unary()]
        while self._at_word("and"):
            self.pos += 1
            items.append(self._unary())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def _unary(self) -> FilterExpr:
        if self._at_word("not"):
            self.pos += 1
            return Not(self._unary())
        return self._primary()

    def _primary(self) -> FilterExpr:
        token = self._peek()
        if token is None:
            raise self._error(None)
        if token.kind == "(":
            self.pos += 1
            expr = self._or()
            self._expect(")")
            return expr
        following = self.tokens[self.pos + 1] if self.pos + 1 < len(self.tokens) else None
        if token.kind == "word" and following is not None and following.kind == "(":
            return self._function()
        return self._comparison()

    def _function(self) -> FilterExpr:
        token = self._next()
        name = token.text
        if name not in _FUNCTIONS:
            raise ODataQueryError(
                f"An unknown function with name '{name}' was found. This may also be a function "
                f"import or a key lookup on a navigation property, which is not allowed."
            )
        self._expect("(")
        column_token = self._expect("word")
        column = self._column(column_token)
        self._expect(",")
        literal = self._literal(self._next())
        self._expect(")")
        category = CATEGORY_BY_TYPE.get(self.columns[column], "other")
        if category != "string" or literal.kind != "string":
            raise ODataQueryError(
                f"No function signature for the function with name '{name}' matches the "
                f"specified arguments. The function signatures considered are: "
                f"{name}(Edm.String Nullable=true, Edm.String Nullable=true)."
            )
        return FunctionCall(name, column, literal.value)

    def _comparison(self) -> FilterExpr:
        left = self._next()
        op_token = self._next()
        if op_token.kind != "word" or op_token.text not in _OP_KIND:
            raise self._error(op_token)
        right = self._next()
        op = op_token.text
        left_is_column = left.kind == "word" and self._is_identifier(left)
        right_is_column = right.kind == "word" and self._is_identifier(right)
        if left_is_column and right_is_column:
            raise ODataQueryError(
                "The simulator, like Dataverse, only compares a column with a literal "
                f"(at position {left.pos} in '{self.text}')."
            )
        if left_is_column:
            column, literal = self._column(left), self._literal(right)
        elif right_is_column:
            column, literal = self._column(right), self._literal(left)
            op = _FLIPPED[op]
        else:
            raise self._error(left)
        return self._typed_comparison(column, op, literal)

    def _is_identifier(self, token: _Token) -> bool:
        text = token.text
        if text in ("true", "false", "null") or not _IDENT_RE.match(text):
            return False
        return True

    def _column(self, token: _Token) -> str:
        if token.kind != "word" or not _IDENT_RE.match(token.text):
            raise self._error(token)
        if token.text not in self.columns:
            raise property_not_found(token.text, self.type_name)
        return token.text

    def _literal(self, token: _Token) -> _Literal:
        if token.kind == "str":
            return _Literal("string", token.text, "Edm.String")
        if token.kind != "word":
            raise self._error(token)
        text = token.text
        if text == "null":
            return _Literal("null", None, "null")
        if text in ("true", "false"):
            return _Literal("bool", text == "true", "Edm.Boolean")
        if _GUID_RE.match(text):
            return _Literal("guid", text.lower(), "Edm.Guid")
        if _DATETIME_RE.match(text) or _DATE_RE.match(text):
            try:
                value = _datetime_literal(text)
            except ValueError as exc:
                raise ODataQueryError(
                    f"The DateTimeOffset text '{text}' should be in format "
                    f"'yyyy-mm-ddThh:mm:ss('.'s+)?(zzzzzz)?' and each field value is within "
                    f"valid range."
                ) from exc
            edm = "Edm.Date" if _DATE_RE.match(text) else "Edm.DateTimeOffset"
            return _Literal("datetime", value, edm)
        if _INT_RE.match(text):
            number = int(text)
            edm = "Edm.Int32" if -(2**31) <= number < 2**31 else "Edm.Int64"
            return _Literal("int", number, edm)
        if _DECIMAL_RE.match(text):
            return _Literal("decimal", float(text.rstrip("mMdDfF")), "Edm.Decimal")
        raise self._error(token)

    def _typed_comparison(self, column: str, op: str, literal: _Literal) -> Comparison:
        attribute_type = self.columns[column]
        category = CATEGORY_BY_TYPE.get(attribute_type, "other")
        if literal.kind == "null":
            return Comparison(column, op, None, category)
        ok = False
        value: Any = literal.value
        if category == "string":
            ok = literal.kind == "string"
        elif category in ("int", "number"):
            ok = literal.kind in ("int", "decimal")
        elif category == "bool":
            ok = literal.kind == "bool"
        elif category in ("datetime", "date"):
            # A date literal is midnight on a datetime column, and an Edm.Date column
            # promotes to Edm.DateTimeOffset against a datetime literal, as in OData.
            ok = literal.kind == "datetime"
        elif category == "guid":
            if literal.kind == "guid":
                ok = True
            elif literal.kind == "string" and _GUID_RE.match(literal.value):
                # Quoted GUIDs appear in the wild and Dataverse converts them.
                ok, value = True, literal.value.lower()
        if not ok:
            raise ODataQueryError(
                "A binary operator with incompatible types was detected. Found operand types "
                f"'{EDM_BY_TYPE.get(attribute_type, 'Edm.Untyped')}' and '{literal.edm}' "
                f"for operator kind '{_OP_KIND[op]}'."
            )
        return Comparison(column, op, value, category)


def parse_filter(text: str, columns: Mapping[str, str], type_name: str) -> FilterExpr:
    """Parse a `$filter` expression against a table's columns (row key -> AttributeType)."""
    return _Parser(text, columns, type_name).parse()


# ---------------------------------------------------------------------------------------------
# $filter: evaluation
# ---------------------------------------------------------------------------------------------


def compile_filter(expr: FilterExpr) -> Predicate:
    """Turn a parsed filter into a fast row predicate (closures, no per-row parsing)."""
    if isinstance(expr, Comparison):
        return _compile_comparison(expr)
    if isinstance(expr, FunctionCall):
        return _compile_function(expr)
    if isinstance(expr, Not):
        inner = compile_filter(expr.item)
        return lambda row: not inner(row)
    if expr.op == "or":
        membership = _compile_membership(expr)
        if membership is not None:
            return membership
        parts = [compile_filter(item) for item in _flatten(expr, "or")]
        return lambda row: any(part(row) for part in parts)
    parts = [compile_filter(item) for item in _flatten(expr, "and")]
    return lambda row: all(part(row) for part in parts)


def _flatten(expr: FilterExpr, op: str) -> list[FilterExpr]:
    """Operands of nested same-operator BoolOps, e.g. `(a or b) or c` -> [a, b, c]."""
    out: list[FilterExpr] = []
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, BoolOp) and node.op == op:
            stack.extend(reversed(node.items))
        else:
            out.append(node)
    return out


def _compile_membership(expr: BoolOp) -> Predicate | None:
    """`c eq a or c eq b or ...` on one column becomes a set lookup: O(1) per row, not O(terms)."""
    items = _flatten(expr, "or")
    column: str | None = None
    category = ""
    values: set[Any] = set()
    for item in items:
        if not isinstance(item, Comparison) or item.op != "eq" or item.value is None:
            return None
        if column is None:
            column, category = item.column, item.category
        elif item.column != column:
            return None
        if category == "datetime":
            canonical, has_fraction = item.value
            if not has_fraction:
                values.add(canonical)
        elif category == "date":
            canonical, has_fraction = item.value
            if not has_fraction and canonical.endswith(_MIDNIGHT):
                values.add(canonical[:10])
        elif category == "string":
            values.add(item.value.casefold())
        else:
            values.add(item.value)
    assert column is not None
    col = column
    frozen = frozenset(values)
    if category == "string":
        return lambda row: (v := row[col]) is not None and v.casefold() in frozen
    return lambda row: row[col] in frozen


def _compile_function(expr: FunctionCall) -> Predicate:
    col = expr.column
    needle = expr.value.casefold()
    if expr.name == "contains":
        return lambda row: (v := row[col]) is not None and needle in v.casefold()
    if expr.name == "startswith":
        return lambda row: (v := row[col]) is not None and v.casefold().startswith(needle)
    return lambda row: (v := row[col]) is not None and v.casefold().endswith(needle)


def _compile_comparison(expr: Comparison) -> Predicate:
    col, op, value, category = expr.column, expr.op, expr.value, expr.category
    if value is None:
        if op == "eq":
            return lambda row: row[col] is None
        if op == "ne":
            return lambda row: row[col] is not None
        return lambda row: False
    func = _OP_FUNC[op]
    if category == "string":
        folded = value.casefold()
        if op == "eq":
            return lambda row: (v := row[col]) is not None and v.casefold() == folded
        if op == "ne":
            return lambda row: (v := row[col]) is None or v.casefold() != folded
        return lambda row: (v := row[col]) is not None and func(v.casefold(), folded)
    if category == "guid":
        if op == "eq":
            return lambda row: row[col] == value
        if op == "ne":
            return lambda row: row[col] != value
        key = guid_order_key(value)
        return lambda row: (v := row[col]) is not None and func(guid_order_key(v), key)
    if category == "datetime":
        # Stored values are canonical whole-second strings, so string order is time order.
        return _compile_stamp_comparison(col, op, value, "")
    if category == "date":
        return _compile_stamp_comparison(col, op, value, _MIDNIGHT)
    if op == "eq":
        return lambda row: (v := row[col]) is not None and v == value
    if op == "ne":
        return lambda row: (v := row[col]) is None or v != value
    return lambda row: (v := row[col]) is not None and func(v, value)



def _compile_stamp_comparison(col: str, op: str, value: tuple[str, bool],
                              suffix: str) -> Predicate:
    """A datetime column (suffix "") or an Edm.Date column ("YYYY-MM-DD", suffix _MIDNIGHT:
    the date is its midnight UTC, so `d lt 1980-01-01` and `d lt 1980-01-01T00:00:00Z` agree)
    against a literal, as canonical whole-second strings compare in time order."""
    canonical, has_fraction = value
    if has_fraction:
        # The literal lies strictly between two whole seconds.
        if op == "eq":
            return lambda row: False
        if op == "ne":
            return lambda row: True
        if op in ("gt", "ge"):
            return lambda row: (v := row[col]) is not None and v + suffix > canonical
        return lambda row: (v := row[col]) is not None and v + suffix <= canonical
    if op == "eq":
        return lambda row: (v := row[col]) is not None and v + suffix == canonical
    if op == "ne":
        return lambda row: (v := row[col]) is None or v + suffix != canonical
    func = _OP_FUNC[op]
    return lambda row: (v := row[col]) is not None and func(v + suffix, canonical)


# ---------------------------------------------------------------------------------------------
# Planning helpers: let the engine avoid full scans for key lookups and key ranges
# ---------------------------------------------------------------------------------------------


def conjuncts(expr: FilterExpr) -> list[FilterExpr]:
    """Top-level `and` operands (the expression itself if it is not an `and`)."""
    if isinstance(expr, BoolOp) and expr.op == "and":
        return _flatten(expr, "and")
    return [expr]


def key_equalities(expr: FilterExpr, column: str) -> frozenset[str] | None:
    """GUIDs when expr is `column eq g` or an or-chain of such terms; otherwise None."""
    items = _flatten(expr, "or") if isinstance(expr, BoolOp) and expr.op == "or" else [expr]
    values: set[str] = set()
    for item in items:
        if not (
            isinstance(item, Comparison)
            and item.column == column
            and item.op == "eq"
            and item.category == "guid"
            and item.value is not None
        ):
            return None
        values.add(item.value)
    return frozenset(values)


def key_bounds(expr: FilterExpr, column: str) -> list[tuple[str, str]]:
    """(op, guid) range conditions on the key column among the top-level conjuncts."""
    bounds: list[tuple[str, str]] = []
    for item in conjuncts(expr):
        if (
            isinstance(item, Comparison)
            and item.column == column
            and item.category == "guid"
            and item.op in ("gt", "ge", "lt", "le")
            and item.value is not None
        ):
            bounds.append((item.op, item.value))
    return bounds
