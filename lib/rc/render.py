"""Text output shared by the CLI and the web: tables, CSV/TSV, JSON, ages.

Rows are dicts; `columns` names the keys to show, in order, and doubles as
the header. Every format shows the same rows, so a script can switch from
the table to --csv without surprises."""
import csv
import io

import orjson

ELLIPSIS = "…"
MIN_COLUMN_WIDTH = 3      # a truncated column still shows two characters and "…"
COLUMN_GAP = "  "

COLOURS = {"red": 31, "green": 32, "yellow": 33, "blue": 34, "magenta": 35,
           "cyan": 36, "grey": 90, "bold": 1}


def cell(value):
    """How one value reads in text: nothing for None, one line always."""
    if value is None:
        return ""
    if isinstance(value, float):
        value = "%g" % round(value, 1) if abs(value) < 1e6 else "%.0f" % value
    elif isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    return " ".join(str(value).splitlines())


def shorten(text, width):
    return text if len(text) <= width else text[:max(width - 1, 0)] + ELLIPSIS


def table(rows, columns, width=None, header=True, colourize=None):
    """An aligned table; with `width`, the widest columns give way until it
    fits. `colourize(column, value)` may name a colour for a cell; colour is
    added after padding so escape codes never upset the alignment."""
    texts = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column) if header else 0] + [len(line[i]) for line in texts])
              for i, column in enumerate(columns)]
    if width:
        fit(widths, width - len(COLUMN_GAP) * (len(columns) - 1))
    lines = [columns] if header else []
    lines += texts
    out = []
    for number, line in enumerate(lines):
        cells = []
        for i, text in enumerate(line):
            padded = shorten(text, widths[i]).ljust(widths[i])
            if colourize and (number > 0 or not header):
                padded = colour(padded, colourize(columns[i], text), True)
            cells.append(padded)
        out.append(COLUMN_GAP.join(cells).rstrip())
    return "\n".join(out) + "\n" if out else ""


def fit(widths, room):
    """Narrow the widest column, one character at a time, until all fit."""
    while sum(widths) > room:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= MIN_COLUMN_WIDTH:
            return
        widths[widest] -= 1


def csv_text(rows, columns, header=True):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def separated_text(rows, columns, separator, header=True):
    """One row per line, fields joined by `separator` (tab, "|"); a separator
    inside a value becomes a space so `cut` and `awk -F` keep working."""
    lines = [columns] if header else []
    lines += [[cell(row.get(column)) for column in columns] for row in rows]
    return "".join(separator.join(text.replace(separator, " ") for text in line) + "\n"
                   for line in lines)


def tsv_text(rows, columns, header=True):
    return separated_text(rows, columns, "\t", header)


def json_text(value):
    return orjson.dumps(value, default=repr,
                        option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE).decode()


def age(seconds):
    """A short duration: "3s", "5m", "2h", "4d"."""
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def colour(text, name, enabled):
    if not enabled or name not in COLOURS:
        return text
    return "\x1b[%dm%s\x1b[0m" % (COLOURS[name], text)


def key_values(pairs, align=False):
    """`key: value` lines; aligned for people, plain (one space) for scripts."""
    pairs = list(pairs)
    width = max([len(key) + 1 for key, _ in pairs if align] or [0])
    return "".join(("%s %s" % ((key + ":").ljust(width), cell(value))).rstrip() + "\n"
                   for key, value in pairs)
