"""A small template engine: the subset of Jinja's syntax that web shops and mailers use, written plainly.

    render("Hello {{ user.name | upper }}!{% for t in tags %} #{{ t }}{% endfor %}", context) -> str

Supported: `{{ expr }}`; `{% for x in expr %}...{% endfor %}` with `loop.index`, `loop.index0`,
`loop.first`, `loop.last`, `loop.length`; `{% if %}...{% elif %}...{% else %}...{% endif %}`;
`{% set x = expr %}`. Expressions: string and number literals, names with `.attr` lookups, parentheses,
`not`, `and`, `or`, `==`, `!=`, `<`, `>`, `<=`, `>=`, `in`, `not in`, and filters (`| name` or
`| name(args)`): upper, lower, capitalize, trim, length, join, default, escape (or e), replace, first, last.
An undefined name renders as nothing; any other value as `str(value)`, as Jinja does.

This file is what experiments change: make `render` faster without changing a single character of what it
returns. The harness checks every output against Jinja2 itself.
"""

from __future__ import annotations

import re
from typing import Any

CACHE_SIZE = 0  # templates and expressions kept parsed between calls (0: none)
BUFFER = 0  # 0: build the output by concatenation; 1: collect pieces and join once

_TAG = re.compile(r"({{.*?}}|{%.*?%})", re.S)
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d+|\d+)|(?P<str>'[^']*'|\"[^\"]*\")|(?P<op>==|!=|<=|>=|[<>()|.,])"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*))"
)
_cache: dict[tuple[str, str], list] = {}  # (kind, text) -> parsed, oldest first


class Undefined:
    """A name the context does not have: renders as nothing, is false, has no attributes."""

    def __str__(self) -> str:
        return ""

    def __bool__(self) -> bool:
        return False


UNDEFINED = Undefined()


def _escape(value: Any) -> str:
    text = str(value)
    for old, new in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&#34;"), ("'", "&#39;")):
        text = text.replace(old, new)
    return text


FILTERS = {
    "upper": lambda v: str(v).upper(),
    "lower": lambda v: str(v).lower(),
    "capitalize": lambda v: str(v).capitalize(),
    "trim": lambda v: str(v).strip(),
    "length": len,
    "join": lambda v, sep="": str(sep).join(str(x) for x in v),
    "default": lambda v, fallback="": fallback if isinstance(v, Undefined) else v,
    "escape": _escape,
    "e": _escape,
    "replace": lambda v, old, new: str(v).replace(old, new),
    "first": lambda v: next(iter(v), UNDEFINED),
    "last": lambda v: list(v)[-1] if len(v) else UNDEFINED,
}


def tokens(expression: str) -> list[tuple[str, str]]:
    """(kind, text) pairs of an expression."""
    out, pos, expression = [], 0, expression.strip()
    while pos < len(expression):
        match = _TOKEN.match(expression, pos)
        if not match or match.end() == pos:
            raise SyntaxError(f"cannot read {expression[pos:]!r}")
        out.append((match.lastgroup, match.group(match.lastgroup)))
        pos = match.end()
    return out


class Expr:
    """A recursive-descent evaluator over an expression's tokens, one evaluation per object."""

    def __init__(self, expression: str, context: dict):
        self.toks, self.i, self.context = cached("expression", expression, tokens), 0, context

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        self.i += 1
        return self.toks[self.i - 1]

    def value(self) -> Any:
        result = self.or_()
        if self.i != len(self.toks):
            raise SyntaxError(f"unexpected {self.peek()!r}")
        return result

    def or_(self) -> Any:
        left = self.and_()
        while self.peek() == "or":
            self.take()
            right = self.and_()
            left = left or right
        return left

    def and_(self) -> Any:
        left = self.not_()
        while self.peek() == "and":
            self.take()
            right = self.not_()
            left = left and right
        return left

    def not_(self) -> Any:
        if self.peek() == "not":
            self.take()
            return not self.not_()
        return self.compare()

    def compare(self) -> Any:
        left = self.filtered()
        op = self.peek()
        if op == "not" and self.i + 1 < len(self.toks) and self.toks[self.i + 1][1] == "in":
            self.take()
            self.take()
            return left not in self.filtered()
        if op in ("==", "!=", "<", ">", "<=", ">=", "in"):
            self.take()
            right = self.filtered()
            if op == "==":
                return left == right
            if op == "!=":
                return left != right
            if op == "<":
                return left < right
            if op == ">":
                return left > right
            if op == "<=":
                return left <= right
            if op == ">=":
                return left >= right
            return left in right
        return left

    def filtered(self) -> Any:
        result = self.primary()
        while self.peek() == "|":
            self.take()
            name = self.take()[1]
            args = []
            if self.peek() == "(":
                self.take()
                while self.peek() != ")":
                    args.append(self.or_())
                    if self.peek() == ",":
                        self.take()
                self.take()
            result = FILTERS[name](result, *args)
        return result

    def primary(self) -> Any:
        kind, text = self.take()
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "str":
            return text[1:-1]
        if text == "(":
            result = self.or_()
            self.take()
            return result
        result = self.context.get(text, UNDEFINED)
        while self.peek() == ".":
            self.take()
            result = lookup(result, self.take()[1])
        return result


def lookup(obj: Any, name: str) -> Any:
    """Jinja's `obj.name`: the attribute, else the item, else undefined."""
    if hasattr(obj, name) and not isinstance(obj, Undefined):
        return getattr(obj, name)
    try:
        return obj[name]
    except (KeyError, TypeError, IndexError):
        return UNDEFINED


def parse(source: str) -> list:
    """The template as a tree: text, ("out", expr), ("for", name, expr, body), ("if", [(expr, body)...],
    else_body), ("set", name, expr)."""
    root: list = []
    stack: list[tuple[list, Any]] = []
    body = root
    if source.endswith("\n"):  # as Jinja does, a template's last newline is not part of its output
        source = source[:-1]
    for piece in _TAG.split(source):
        if piece.startswith("{{"):
            body.append(("out", piece[2:-2]))
        elif piece.startswith("{%"):
            words = piece[2:-2].strip()
            head = words.split(None, 1)[0]
            if head == "for":
                name, _, expr = words[4:].partition(" in ")
                node = ("for", name.strip(), expr, [])
                body.append(node)
                stack.append((body, node))
                body = node[3]
            elif head == "if":
                node = ("if", [(words[3:], [])], [])
                body.append(node)
                stack.append((body, node))
                body = node[1][0][1]
            elif head == "elif":
                node = stack[-1][1]
                node[1].append((words[5:], []))
                body = node[1][-1][1]
            elif head == "else":
                body = stack[-1][1][2]
            elif head in ("endfor", "endif"):
                body, _ = stack.pop()
            elif head == "set":
                name, _, expr = words[4:].partition("=")
                body.append(("set", name.strip(), expr))
            else:
                raise SyntaxError(f"unknown tag {head!r}")
        elif piece:
            body.append(piece)
    return root


class Loop:
    """What `loop` means inside a for."""

    def __init__(self, index0: int, length: int):
        self.index0, self.index, self.length = index0, index0 + 1, length
        self.first, self.last = index0 == 0, index0 == length - 1


def run(nodes: list, context: dict) -> str:
    out = "" if BUFFER == 0 else []
    for node in nodes:
        if isinstance(node, str):
            piece = node
        elif node[0] == "out":
            piece = str(Expr(node[1], context).value())
        elif node[0] == "for":
            items = list(Expr(node[2], context).value())
            piece = ""
            for i, item in enumerate(items):
                inner = dict(context)
                inner[node[1]] = item
                inner["loop"] = Loop(i, len(items))
                piece = piece + run(node[3], inner)
        elif node[0] == "if":
            piece = ""
            for condition, body in node[1]:
                if Expr(condition, context).value():
                    piece = run(body, context)
                    break
            else:
                piece = run(node[2], context)
        else:
            context[node[1]] = Expr(node[2], context).value()
            piece = ""
        if BUFFER == 0:
            out = out + piece
        else:
            out.append(piece)
    return out if BUFFER == 0 else "".join(out)


def cached(kind: str, text: str, make: Any) -> list:
    """`make(text)`, remembered for the CACHE_SIZE most recently added texts."""
    if CACHE_SIZE and (kind, text) in _cache:
        return _cache[kind, text]
    made = make(text)
    if CACHE_SIZE:
        if len(_cache) >= CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[kind, text] = made
    return made


def render(source: str, context: dict) -> str:
    """`source` rendered with `context` (which is not changed)."""
    return run(cached("template", source, parse), dict(context))
