"""Text output shared by the CLI and the web terminal: tables, CSV/TSV, JSON,
ages, progress bars, the device grid and log lines.

Rows are dicts; `columns` names the keys to show, in order, and doubles as
the header. Every format shows the same rows, so a script can switch from
the table to --csv without surprises."""
import csv
import io
import re
import time

import orjson

from rc.log import JSON_ESCAPES, TERMINAL_UNSAFE

ELLIPSIS = "…"
MIN_COLUMN_WIDTH = 3      # a truncated column still shows two characters and "…"
KEPT_VALUE = 16           # values (ids) up to this many characters a narrow table keeps whole
KEPT_HEADER = 8           # a header a narrow table cuts keeps 7 characters and "…"
COLUMN_GAP = "  "

BAR_WIDTH = 10            # characters inside a progress bar's brackets
GRID_CELL_WIDTH = 24      # characters of one device's cell in the grid, borders included
# Control characters from devices (hostnames, outputs) could move the cursor or
# retitle a terminal; they are shown as "?" instead. In a table's cell so are
# the invisible ones that reorder or hide text: the bidirectional embeddings,
# overrides, isolates and marks (a device named "\u202egood" reads as
# "doog" and can pass for another in `rc devices`), the zero-width space and
# the BOM. Hebrew and Arabic letters are left alone, and so are the joiners
# (U+200C, U+200D) that Persian and emoji sequences need.
CONTROL = re.compile("[\x00-\x1f\x7f%s]" % "".join(map(chr, TERMINAL_UNSAFE)))
CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")   # OWASP, CSV injection
NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?\Z")

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
    return CONTROL.sub("?", " ".join(str(value).splitlines()).replace("\t", " "))


def printable(text):
    """Text from a device as it may reach a terminal: lines and tabs kept,
    every other control character (escape sequences) made visible as "?"."""
    return CONTROL_BUT_LINES.sub("?", text)


def counted(number, noun):
    """"1 task", "2 tasks"."""
    return "%d %s%s" % (number, noun, "" if number == 1 else "s")


def shorten(text, width):
    return text if len(text) <= width else text[:max(width - 1, 0)] + ELLIPSIS


def table(rows, columns, width=None, header=True, colourize=None):
    """An aligned table; with `width`, the widest columns give way until it
    fits. `colourize(column, value)` may name a colour for a cell; colour is
    added after padding so escape codes never upset the alignment."""
    texts = [[cell(row.get(column)) for column in columns] for row in rows]
    values = [max([0] + [len(line[i]) for line in texts]) for i in range(len(columns))]
    widths = [max(len(column) if header else 0, value) for column, value in zip(columns, values)]
    if width:
        kept = columns_that_fit(widths, columns, values, width)
        columns, widths, values = columns[:kept], widths[:kept], values[:kept]
        texts = [line[:kept] for line in texts]
        room = width - len(COLUMN_GAP) * (len(columns) - 1)
        fit(widths, room, [max(value, MIN_COLUMN_WIDTH) for value in values])
        fit(widths, room)
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


def columns_that_fit(widths, columns, values, width):
    """How many columns, from the left, fit in `width`, each keeping its
    values up to KEPT_VALUE characters whole and its header up to
    KEPT_HEADER: on a phone a table drops its last columns rather than show
    "DE… ST… RO…" or cut ids. The first column always stays."""
    least = [min(w, max(min(v, KEPT_VALUE), min(len(c), KEPT_HEADER), MIN_COLUMN_WIDTH))
             for w, c, v in zip(widths, columns, values)]
    count = len(columns)
    while count > 1 and sum(least[:count]) + len(COLUMN_GAP) * (count - 1) > width:
        count -= 1
    return count


def fit(widths, room, least=None):
    """Narrow the widest column, one character at a time, until all fit;
    none below `least` (table() first cuts only headers wider than their
    values, so a long column name gives way before a device's id does)."""
    least = least or [MIN_COLUMN_WIDTH] * len(widths)
    while sum(widths) > room:
        widest = max(range(len(widths)), key=lambda i: (widths[i] > least[i], widths[i]))
        if widths[widest] <= least[widest]:
            return
        widths[widest] -= 1


def spreadsheet_cell(value):
    """cell() for CSV or TSV, which a spreadsheet may open (or be pasted
    into: it splits tab-separated text into cells): text a device chose that
    begins with `=`, `+`, `-`, `@` (or a tab or CR) would run there as a
    formula, so it gets a leading `'`, as OWASP recommends (CSV injection);
    a plain number (`-3.5`) stays as it is."""
    text = cell(value)
    if text[:1] in FORMULA_STARTS and not NUMBER.match(text):
        return "'" + text
    return text


def csv_text(rows, columns, header=True):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([spreadsheet_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def separated_text(rows, columns, separator, header=True, shown=cell):
    """One row per line, fields joined by `separator` (tab, "|"); a separator
    inside a value becomes a space so `cut` and `awk -F` keep working."""
    lines = [columns] if header else []
    lines += [[shown(row.get(column)) for column in columns] for row in rows]
    return "".join(separator.join(text.replace(separator, " ") for text in line) + "\n"
                   for line in lines)


def tsv_text(rows, columns, header=True):
    return separated_text(rows, columns, "\t", header, spreadsheet_cell)


def json_text(value):
    """Indented JSON; what a device chose may be in it, so the characters a
    terminal acts on that JSON need not escape are escaped (log.JSON_ESCAPES)."""
    return orjson.dumps(value, default=repr,
                        option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE).decode() \
        .translate(JSON_ESCAPES)


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
    """`key: value` lines; aligned for people, plain (one space) for scripts.
    Keys too may come from a device (its profile's and metrics' names)."""
    pairs = [(cell(key), value) for key, value in pairs]
    width = max([len(key) + 1 for key, _ in pairs if align] or [0])
    return "".join(("%s %s" % ((key + ":").ljust(width), cell(value))).rstrip() + "\n"
                   for key, value in pairs)


# -- bars, the device grid and log lines ------------------------------------------

def bar(fraction, width=BAR_WIDTH, colour_enabled=False, calm=False):
    """[#####.....] for a fraction from 0 to 1; an unknown value is blank.
    Past three quarters it is yellow, past nine tenths red; a `calm` bar
    (busy slots, a task's progress: full is work, not trouble) stays blue."""
    if fraction is None:
        return "[" + " " * width + "]"
    fraction = min(max(float(fraction), 0.0), 1.0)
    filled = int(round(fraction * width))
    name = "blue" if calm else "red" if fraction > 0.9 else "yellow" if fraction > 0.75 \
        else "green"
    return "[" + colour("#" * filled, name, colour_enabled) + "." * (width - filled) + "]"


def percent(fraction):
    return "  n/a" if fraction is None else "%4d%%" % round(min(max(fraction, 0), 1) * 100)


def progress_line(label, fraction, width, colour_enabled=False, calm=False):
    """label [#####.....]  50% in `width` characters: the bar takes the room left."""
    room = max(width - len(label) - 1 - 2 - 5 - 1, 4)
    return "%s %s %s" % (label, bar(fraction, room, colour_enabled, calm), percent(fraction))


def device_grid(cells, width=80, colour_enabled=False):
    """One box per device, as many per row as fit in `width`. Each cell is a
    dict: device, status, cpu, memory, battery (fractions or None), active,
    slots."""
    per_row = max(1, (width + 1) // (GRID_CELL_WIDTH + 1))
    lines = []
    for start in range(0, len(cells), per_row):
        boxes = [grid_cell(cell_, colour_enabled) for cell_ in cells[start:start + per_row]]
        for row in zip(*boxes):
            lines.append(" ".join(row))
    return "".join(line + "\n" for line in lines)


def grid_cell(device, colour_enabled):
    inner = GRID_CELL_WIDTH - 2
    status = cell(device.get("status"))
    name = shorten(cell(device.get("device")), inner - len(status) - 1)
    state_colour = "green" if status == "online" else "red"
    rows = [(name.ljust(inner - len(status)) + colour(status, state_colour, colour_enabled),
             inner)]
    for label, key in (("CPU", "cpu"), ("MEM", "memory"), ("BAT", "battery")):
        rows.append((label + " " + bar(device.get(key), inner - 11, colour_enabled)
                     + percent(device.get(key)), inner))
    tasks_text = "tasks %s/%s" % (cell(device.get("active")) or "0",
                                  cell(device.get("slots")) or "?")
    rows.append((tasks_text.ljust(inner), inner))
    border = "+" + "-" * inner + "+"
    return [border] + ["|" + text + "|" for text, _ in rows] + [border]


LEVEL_COLOURS = {"debug": "grey", "warning": "yellow", "error": "red"}


def log_line(record, colour_enabled=False):
    """One log record as a line: time, program, LEVEL (coloured by level),
    event, then key=value fields. A line that was not JSON stays as it was."""
    if not isinstance(record, dict):
        return printable(str(record))
    level = str(record.get("level", ""))
    fields = " ".join("%s=%s" % (key, log_value(value)) for key, value in record.items()
                      if key not in ("time", "program", "level", "event"))
    text = "%s %s %s %s %s" % (time.strftime("%H:%M:%S", time.localtime(record["time"])),
                               cell(record.get("program")),
                               colour(cell(level.upper()), LEVEL_COLOURS.get(level),
                                      colour_enabled),
                               cell(record.get("event")), cell(fields))
    return text.rstrip()


def log_value(value):
    if isinstance(value, str) and value and not any(c.isspace() or c == '"' for c in value):
        return value
    return orjson.dumps(value, default=repr).decode()
