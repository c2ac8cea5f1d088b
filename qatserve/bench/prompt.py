"""The bench prompt: exactly N tokens of a code-edit request, the same ids for every server and lane.

A Python module, then the instruction to write it again with one name changed, then the first line of
the rewrite: the continuation copies most of the module, as code-editing requests do, which is what
prompt lookup and draft models are used for (a prose prompt would show drafting at its worst; a
fixed, stated prompt keeps lanes and runs comparable). Requests differ only in a short first line
(`salt`), so no server can reuse a previous request's prompt from its cache.
"""

from __future__ import annotations

from typing import Callable

MODULE = '''"""Stock ledger: receipts, issues and valuation of warehouse items."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field


@dataclass
class Movement:
    """One receipt (positive quantity) or issue (negative quantity) of an item."""

    item: str
    quantity: int
    unit_cost: float
    day: dt.date
    note: str = ""


@dataclass
class Ledger:
    movements: list[Movement] = field(default_factory=list)

    def receive(self, item: str, quantity: int, unit_cost: float, day: dt.date, note: str = "") -> None:
        if quantity <= 0:
            raise ValueError(f"a receipt needs a positive quantity, got {quantity}")
        if unit_cost < 0:
            raise ValueError(f"unit cost must not be negative, got {unit_cost}")
        self.movements.append(Movement(item, quantity, unit_cost, day, note))

    def issue(self, item: str, quantity: int, day: dt.date, note: str = "") -> float:
        """Take `quantity` out of stock first-in first-out; returns the cost of what left."""
        if quantity <= 0:
            raise ValueError(f"an issue needs a positive quantity, got {quantity}")
        on_hand = self.on_hand(item)
        if quantity > on_hand:
            raise ValueError(f"cannot issue {quantity} of {item}: only {on_hand} on hand")
        total = 0.0
        remaining = quantity
        for layer_quantity, layer_cost in self.layers(item):
            take = min(remaining, layer_quantity)
            total += take * layer_cost
            remaining -= take
            if remaining == 0:
                break
        self.movements.append(Movement(item, -quantity, total / quantity, day, note))
        return total

    def on_hand(self, item: str) -> int:
        total = 0
        for m in self.movements:
            if m.item == item:
                total += m.quantity
        return total

    def layers(self, item: str) -> list[tuple[int, float]]:
        """The receipt layers still in stock, oldest first, as (quantity, unit cost)."""
        layers: list[list] = []
        for m in self.movements:
            if m.item != item:
                continue
            if m.quantity > 0:
                layers.append([m.quantity, m.unit_cost])
                continue
            total = -m.quantity
            while total > 0 and layers:
                take = min(total, layers[0][0])
                layers[0][0] -= take
                total -= take
                if layers[0][0] == 0:
                    layers.pop(0)
        return [(q, c) for q, c in layers]

    def valuation(self, item: str) -> float:
        total = 0.0
        for quantity, unit_cost in self.layers(item):
            total += quantity * unit_cost
        return total

    def items(self) -> list[str]:
        return sorted({m.item for m in self.movements})

    def report(self, day: dt.date) -> list[dict]:
        rows = []
        for item in self.items():
            moved = [m for m in self.movements if m.item == item and m.day <= day]
            received = sum(m.quantity for m in moved if m.quantity > 0)
            issued = -sum(m.quantity for m in moved if m.quantity < 0)
            rows.append({"item": item, "received": received, "issued": issued,
                         "on_hand": received - issued, "value": round(self.valuation(item), 2)})
        return rows


def read_movements(path: str) -> Ledger:
    """Load a ledger from a CSV file with columns item, quantity, unit_cost, day, note."""
    ledger = Ledger()
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            try:
                quantity = int(row["quantity"])
                day = dt.date.fromisoformat(row["day"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: bad row {row}: {e}") from None
            if quantity > 0:
                ledger.receive(row["item"], quantity, float(row["unit_cost"]), day, row.get("note", ""))
            else:
                ledger.issue(row["item"], -quantity, day, row.get("note", ""))
    return ledger


def write_report(ledger: Ledger, day: dt.date, path: str) -> int:
    rows = ledger.report(day)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["item", "received", "issued", "on_hand", "value"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def slow_movers(ledger: Ledger, day: dt.date, days: int = 90) -> list[str]:
    """Items with stock on hand and no issue in the last `days` days."""
    since = day - dt.timedelta(days=days)
    out = []
    for item in ledger.items():
        if ledger.on_hand(item) == 0:
            continue
        recent = [m for m in ledger.movements if m.item == item and m.quantity < 0 and since <= m.day <= day]
        if not recent:
            out.append(item)
    return out


def reorder_list(ledger: Ledger, minimum: dict[str, int], batch: dict[str, int]) -> dict[str, int]:
    """How much of each item to order so that stock is back above its minimum, in whole batches."""
    orders = {}
    for item, low in minimum.items():
        total = ledger.on_hand(item)
        if total >= low:
            continue
        size = batch.get(item, 1)
        missing = low - total
        orders[item] = ((missing + size - 1) // size) * size
    return orders


def average_cost(ledger: Ledger, item: str) -> float:
    total = 0.0
    count = 0
    for m in ledger.movements:
        if m.item == item and m.quantity > 0:
            total += m.quantity * m.unit_cost
            count += m.quantity
    if count == 0:
        raise ValueError(f"no receipts of {item}")
    return total / count


def monthly_issues(ledger: Ledger, item: str) -> dict[str, int]:
    months: dict[str, int] = {}
    for m in ledger.movements:
        if m.item == item and m.quantity < 0:
            key = f"{m.day.year}-{m.day.month:02d}"
            months[key] = months.get(key, 0) - m.quantity
    return dict(sorted(months.items()))
'''

INSTRUCTION = ("\n\n# The same module again, with the local variable `total` renamed to `running_sum` "
               "everywhere and nothing else changed:\n\n")
FIRST_LINE = '"""Stock ledger: receipts, issues and valuation of warehouse items."""\n'


def salt(k: int) -> str:
    return f"# request {k}\n"


def build_prompt(tokenize: Callable[[str, bool], list[int]], n_tokens: int, k: int) -> list[int]:
    """Exactly n_tokens ids: BOS, salt line k, the module (cut, or repeated, to length), the instruction.

    `tokenize(text, add_special)` is a server's /tokenize; the module is cut at a token boundary, so the
    ids need not be the tokenisation of one string, and every server gets these same ids."""
    head = tokenize(salt(k), True)  # BOS (when the model uses one) + the salt line
    tail = tokenize(INSTRUCTION + FIRST_LINE, False)
    room = n_tokens - len(head) - len(tail)
    if room < 16:
        raise ValueError(f"a prompt of {n_tokens} tokens is too short: the fixed parts take {len(head) + len(tail)}"
                         f" (use at least {len(head) + len(tail) + 16})")
    body = tokenize(MODULE, False)
    while len(body) < room:  # a long prompt: the module again (the rewrite instruction still follows)
        body = body + tokenize("\n\n" + MODULE, False)
    return head + body[:room] + tail
