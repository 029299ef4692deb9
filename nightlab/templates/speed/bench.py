"""The harness of the speed workspace: time render.py on a shop's templates, and check every output.

    python bench.py evaluate --split val    time and check on the validation workload; sign the metric
    python bench.py evaluate --split test   the same on the held-out workload (other data, more of it)

The workload is a set of real-looking templates (a product list, an invoice, an order email, a report with
nested loops) rendered with contexts drawn from a seed that belongs to the split. `render.py` runs in a
jailed worker process (`nightlab.harness.ModelWorker`) that never sees the metric key; this process clocks
each round from the outside, so the code under test cannot touch the clock. Every round has contexts the
worker has not seen before, so remembering outputs buys nothing, and every output must equal, character for
character, what Jinja2 renders from the same template and context; one difference ends the step with a
`FAIL:` line and no metric.

Metric: `render_ms`, the median wall time of one round (lower is better), and `worker_rss_mb`, the worker's
resident memory after the rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

from nightlab import harness

SPLITS = {"val": (1, 160), "test": (2, 240)}  # seed, renders per round
ROUNDS = 7
READY_SECONDS, ROUND_SECONDS = 60.0, 120.0
CODE = Path(__file__).resolve().with_name("render.py")

TEMPLATES = {
    "product list": (
        "<h1>{{ shop.name | upper }}</h1>\n<ul>\n{% for p in products %}"
        '  <li class="{% if p.stock == 0 %}sold-out{% elif p.stock < 5 %}low{% else %}ok{% endif %}">'
        "{{ loop.index }}. {{ p.name | e }} - {{ p.price }} {{ shop.currency }}"
        "{% if p.tags %} [{{ p.tags | join(', ') }}]{% endif %}</li>\n{% endfor %}</ul>\n"
        "{{ products | length }} products{% if not products %}, none yet{% endif %}\n"
    ),
    "invoice": (
        "Invoice {{ invoice.number }} for {{ customer.name | trim | capitalize }}\n"
        "{% for line in invoice.lines %}{{ line.qty }} x {{ line.item | default('item') }} @ {{ line.price }}"
        "{% if line.qty >= 10 %} (bulk){% endif %}{% if not loop.last %}\n{% endif %}{% endfor %}\n"
        "{% set paid = invoice.paid %}{% if paid and invoice.total > 100 %}Paid, thank you.{% elif paid %}"
        "Paid.{% else %}Due: {{ invoice.total }}{% endif %}\n"
    ),
    "order email": (
        "Dear {{ customer.name }},\n{% if customer.vip %}As a valued member, you ship free.\n{% endif %}"
        "Your order {{ order.id | replace('-', '/') }} has {{ order.goods | length }} items:\n"
        "{% for i in order.goods %}- {{ i | lower }}{% if i in order.gifts %} (gift){% endif %}\n"
        "{% endfor %}First: {{ order.goods | first }} Last: {{ order.goods | last }}\n"
        "{% if 'rush' not in order.flags %}Standard delivery.{% else %}Rush delivery!{% endif %}\n"
        "{{ customer.note | default('No note.') | e }}\n"
    ),
    "report": (
        "{% for region in regions %}== {{ region.name }} ==\n{% for s in region.stores %}"
        "{{ loop.index0 }}/{{ loop.length }} {{ s.city }}: {{ s.sales }}"
        "{% if s.sales > region.target %} above{% elif s.sales == region.target %} at{% else %} below"
        "{% endif %} target{% if loop.first %} (first){% endif %}\n{% endfor %}{% endfor %}"
    ),
}
WORDS = ["lamp", "chair", "desk", "mug", "pen", "book", "sock", "hat", "kite", "drum", "vase", "rug"]
NAMES = ["  ada lovelace", "grace hopper ", "Alan <Turing>", "Edsger O'Dijkstra", 'Barbara "Liskov"']


def _item(rng: random.Random) -> dict:
    return {"name": rng.choice(WORDS).title(), "qty": rng.randint(1, 15), "price": rng.randint(1, 500) / 4}


def context(name: str, rng: random.Random) -> dict:
    """A fresh context for one template: sizes and values drawn from `rng`."""
    if name == "product list":
        products = [
            {
                "name": f"{rng.choice(WORDS)} & {rng.choice(WORDS)}",
                "price": rng.randint(100, 99900) / 100,
                "stock": rng.choice([0, 1, 3, 7, 20]),
                "tags": rng.sample(WORDS, rng.randint(0, 3)),
            }
            for _ in range(rng.randint(0, 24))
        ]
        return {"shop": {"name": "the shop", "currency": "EUR"}, "products": products}
    if name == "invoice":
        lines = [_item(rng) | {"item": rng.choice([*WORDS, None]) or ""} for _ in range(rng.randint(1, 20))]
        for line in lines:
            if not line["item"]:
                del line["item"]
        total = round(sum(line["qty"] * line["price"] for line in lines), 2)
        paid = rng.random() < 0.5
        invoice = {"number": rng.randint(1000, 9999), "lines": lines, "total": total, "paid": paid}
        return {"invoice": invoice, "customer": {"name": rng.choice(NAMES)}}
    if name == "order email":
        items = [{"name": rng.choice(WORDS).upper()} for _ in range(rng.randint(1, 12))]
        customer = {"name": rng.choice(NAMES), "vip": rng.random() < 0.3}
        if rng.random() < 0.5:
            customer["note"] = rng.choice(["Leave at <door>", "Ring twice & wait", "Call 'Bob'"])
        order = {
            "id": f"{rng.randint(10, 99)}-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
            "goods": [i["name"] for i in items],
            "gifts": rng.sample([i["name"] for i in items], min(2, len(items))),
            "flags": rng.sample(["rush", "fragile", "gift"], rng.randint(0, 2)),
        }
        return {"customer": customer, "order": order}
    regions = [
        {
            "name": rng.choice(["North", "South", "East", "West"]),
            "target": 500,
            "stores": [
                {
                    "city": rng.choice(WORDS).title() + "ville",
                    "sales": rng.choice([500, rng.randint(0, 1000)]),
                }
                for _ in range(rng.randint(1, 10))
            ],
        }
        for _ in range(rng.randint(1, 6))
    ]
    return {"regions": regions}


def workload(split: str) -> list[list[tuple[str, dict]]]:
    """ROUNDS rounds of (template, context) pairs, every context new; the same for every experiment."""
    seed, per_round = SPLITS[split]
    rng = random.Random(seed)
    rounds = []
    for _ in range(ROUNDS):
        names = [rng.choice(list(TEMPLATES)) for _ in range(per_round)]
        rounds.append([(TEMPLATES[name], context(name, rng)) for name in names])
    return rounds


def expected_outputs(rounds: list[list[tuple[str, dict]]]) -> list[list[str]]:
    """What Jinja2 renders for every pair: the reference the outputs must equal."""
    from jinja2 import Environment

    env = Environment()
    compiled = {source: env.from_string(source) for source in TEMPLATES.values()}
    return [[compiled[source].render(ctx) for source, ctx in pairs] for pairs in rounds]


def first_difference(got: str, want: str) -> str:
    """Where two outputs part, with some text around it."""
    at = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
    )
    around = slice(max(0, at - 20), at + 20)
    return f"at character {at}: got {got[around]!r}, Jinja2 gives {want[around]!r}"


def worker_rss_mb(worker: harness.ModelWorker) -> float:
    """The resident memory of the worker's process tree (the jail included), in MiB."""
    import psutil

    try:
        root = psutil.Process(worker.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.Error:
        return 0.0


def evaluate(split: str) -> int:
    """Time and check render.py on `split`; print the metrics, signed when the loop gave a key."""
    harness.reexec_without_key()
    key = harness.read_key()
    rounds = workload(split)
    expected = expected_outputs(rounds)
    argv = [sys.executable, str(Path(__file__).resolve()), "worker"]
    times, rss = [], 0.0
    try:
        with harness.ModelWorker(
            argv, code=CODE, hidden=[], needed=[Path(__file__).resolve()], max_message=64 << 20
        ) as worker:
            print(f"render worker: sandbox {worker.sandbox}", file=sys.stderr, flush=True)
            worker.start({}, b"", limit=READY_SECONDS)
            for number, (pairs, want) in enumerate(zip(rounds, expected, strict=True), 1):
                request = json.dumps([[source, ctx] for source, ctx in pairs]).encode()
                start = time.perf_counter()
                reply = worker.ask(request, limit=ROUND_SECONDS)
                times.append(time.perf_counter() - start)
                got = json.loads(reply)
                if not isinstance(got, list) or len(got) != len(want):
                    print(f"FAIL: round {number}: expected {len(want)} outputs, got something else")
                    return 1
                for index, (out, ref) in enumerate(zip(got, want, strict=True)):
                    if out != ref:
                        print(f"FAIL: round {number}, render {index}: {first_difference(str(out), ref)}")
                        return 1
            rss = worker_rss_mb(worker)
    except (harness.WorkerError, ValueError) as exc:
        print(f"FAIL: {exc}")
        return 1
    metrics = {"render_ms": round(1000 * statistics.median(times), 3), "worker_rss_mb": round(rss, 1)}
    if key:
        print(harness.sign_metrics(metrics, key), flush=True)
    print(f"split: {split}\nrender_ms: {metrics['render_ms']}\nworker_rss_mb: {metrics['worker_rss_mb']}")
    return 0


def _build(render: ModuleType, hello: dict, weights: bytes) -> harness.Answer:
    """In the worker: render every (template, context) pair of a round with render.py."""

    def answer(request: bytes) -> bytes:
        return json.dumps([render.render(source, ctx) for source, ctx in json.loads(request)]).encode()

    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description="speed harness: time and check render.py.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="time render.py on a split and check its outputs")
    ev.add_argument("--split", choices=sorted(SPLITS), default="val")
    sub.add_parser("worker")  # started by `evaluate`; not for direct use
    args = parser.parse_args()
    if args.command == "worker":
        harness.serve_model(CODE, _build)
        return 0
    return evaluate(args.split)


if __name__ == "__main__":
    sys.exit(main())
