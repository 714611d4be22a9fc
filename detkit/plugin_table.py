"""The ``detkit list-plugins`` table, readable at any terminal width.

A plugin's target (``package.module:Class``) is one long word: folded into a
narrow column it is cut every few letters and can be neither read nor
copied.  So the table is one line per plugin when that fits the width, and
otherwise the target goes on a line of its own under the plugin's other
fields, whole.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

COLUMNS = ("kind", "name", "status", "distribution")  # the status before the longer distribution
TITLE = "detkit plugins"


def _short_status(status: str) -> tuple[str, str]:
    """The status as shown (the reasons are printed below the table) and its style."""
    short = "FAILED" if status.startswith("failed") else "CONFLICT" if status.startswith("conflict") else status
    return short, {"ok": "green", "not loaded": "dim"}.get(short, "bold red")


class PluginTable:
    """``rows``: ``{"kind", "name", "distribution", "version", "target", "status"}`` per plugin."""

    def __init__(self, rows: Sequence[dict[str, str]]):
        self.cells = []
        for row in rows:
            dist = row["distribution"] if row["version"] == "-" else f"{row['distribution']} {row['version']}"
            status, style = _short_status(row["status"])
            self.cells.append((row["kind"], row["name"], status, dist, style, row["target"]))

    def one_line_table(self) -> Table:
        table = Table(title=TITLE, box=box.SIMPLE_HEAD, pad_edge=False)
        for name in (*COLUMNS, "target"):
            table.add_column(name, no_wrap=True)
        for kind, name, status, dist, style, target in self.cells:
            table.add_row(kind, name, Text(status, style=style), dist, target)
        return table

    def two_line_rows(self, width: int) -> Iterator[Text]:
        """The four short fields in columns, each plugin's target indented on the next line."""
        widths = [max(len(h), *(len(c[i]) for c in self.cells)) for i, h in enumerate(COLUMNS)]

        def line(parts: Sequence[tuple[str, str]]) -> Text:
            text = Text(overflow="fold", no_wrap=False)
            for i, (value, style) in enumerate(parts):
                last = i == len(parts) - 1
                text.append(value if last else value.ljust(widths[i]) + "  ", style=style)
            return text

        yield Text(TITLE, style="italic", justify="center")
        yield line([(h, "bold") for h in COLUMNS])
        yield Text("  target", style="bold")
        yield Text("─" * min(width, sum(widths) + 2 * (len(widths) - 1)))
        for kind, name, status, dist, style, target in self.cells:
            yield line([(kind, ""), (name, ""), (status, style), (dist, "")])
            yield Text("  " + target, style="dim", overflow="fold")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = self.one_line_table()
        # Measured unbounded: a measurement within the options is clamped to their width.
        natural = Measurement.get(console, options.update(width=1_000_000), table).maximum
        if not self.cells or natural <= options.max_width:
            yield table
        else:
            yield from self.two_line_rows(options.max_width)


def plugins_table(rows: Sequence[dict[str, str]]) -> PluginTable:
    """The renderable ``detkit list-plugins`` prints (see :class:`PluginTable`)."""
    return PluginTable(rows)
