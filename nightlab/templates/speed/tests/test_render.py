"""render.py against Jinja2 on the constructs it claims, and on the errors it must raise."""

import pytest
import render
from jinja2 import Environment

CASES = [
    ("plain text\n", {}),
    ("{{ name }} and {{ missing }}|", {"name": "Ada"}),
    ("{{ user.name | upper }} is {{ user.age }}", {"user": {"name": "ada", "age": 36}}),
    (
        "{% for x in xs %}{{ loop.index }}/{{ loop.length }}{% if loop.first %}^{% endif %}"
        "{% if loop.last %}${% endif %}{{ x }} {% endfor %}",
        {"xs": ["a", "b", "c"]},
    ),
    ("{% if n > 3 and not small %}big{% elif n == 3 %}three{% else %}small{% endif %}", {"n": 3, "small": 0}),
    (
        "{% set total = price %}{{ total }} {{ 'x' in tags }} {{ 'y' not in tags }}",
        {"price": 2.5, "tags": ["x"]},
    ),
    ("{{ s | trim | capitalize }}|{{ s | replace('a', 'o') }}|{{ s | length }}", {"s": "  banana "}),
    (
        "{{ xs | join(', ') }} {{ xs | first }} {{ xs | last }} {{ nope | default('none') }}",
        {"xs": [1, 2, 3]},
    ),
    ("{{ html | e }} {{ html | escape }}", {"html": "<a href=\"x\">Tom & 'Jerry'</a>"}),
    (
        "{% for r in rows %}{% for c in r.cells %}{{ loop.index0 }}{{ c }}{% endfor %};{% endfor %}",
        {"rows": [{"cells": [1, 2]}, {"cells": []}, {"cells": [3]}]},
    ),
    ("{% for x in xs %}{% set y = x %}{{ y }}{% endfor %}[{{ y }}]", {"xs": [1, 2]}),
]


@pytest.mark.parametrize(("source", "context"), CASES)
def test_output_equals_jinja2(source, context):
    assert render.render(source, context) == Environment().from_string(source).render(context)


def test_render_leaves_the_context_alone():
    context = {"xs": [1, 2]}
    render.render("{% set a = 1 %}{% for x in xs %}{{ x }}{% endfor %}", context)
    assert context == {"xs": [1, 2]}


@pytest.mark.parametrize("source", ["{% frobnicate %}", "{{ 1 + }}", "{{ a b }}"])
def test_unsupported_syntax_is_an_error(source):
    with pytest.raises((SyntaxError, KeyError, IndexError)):
        render.render(source, {})
