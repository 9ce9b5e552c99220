"""Text output: tables that fit, CSV/TSV/JSON of the same rows, ages, colour."""
import orjson

from rc import render

ROWS = [{"NAME": "pi-kitchen", "CPU%": 12.5, "TAGS": ["a", "b"], "NOTE": None},
        {"NAME": "old-laptop", "CPU%": 3.0, "TAGS": [], "NOTE": "line one\nline two"}]
COLUMNS = ["NAME", "CPU%", "TAGS", "NOTE"]


def test_table_aligns_columns_under_their_headers():
    lines = render.table(ROWS, COLUMNS).splitlines()
    assert lines[0].split() == COLUMNS
    assert lines[1].split() == ["pi-kitchen", "12.5", "a,b"]
    assert lines[2].index("3") == lines[0].index("CPU%")
    assert lines[2].endswith("line one line two")   # one row stays one line


def test_table_fits_the_width_by_shortening_the_widest_column():
    rows = [{"ID": 1, "SUMMARY": "x" * 200}]
    lines = render.table(rows, ["ID", "SUMMARY"], width=40).splitlines()
    assert all(len(line) <= 40 for line in lines)
    assert lines[1].endswith("…")
    assert render.table(rows, ["ID", "SUMMARY"]).splitlines()[1].endswith("x" * 200)


def test_a_long_header_gives_way_before_the_values():
    rows = [{"DEVICE_ID": "browser-pi", "MEMORY_PERCENT": 4.5, "ACTIVE_TASKS": 0}]
    lines = render.table(rows, ["DEVICE_ID", "MEMORY_PERCENT", "ACTIVE_TASKS"],
                         width=30).splitlines()
    assert all(len(line) <= 30 for line in lines)
    assert lines[0].startswith("DEVICE_ID ") and lines[1].split() == ["browser-pi", "4.5", "0"]
    assert lines[0].split() == ["DEVICE_ID", "MEMORY_…", "ACTIVE_…"]


def test_table_without_header_and_empty():
    assert render.table(ROWS, COLUMNS, header=False).splitlines()[0].startswith("pi-kitchen")
    assert render.table([], COLUMNS).splitlines() == ["NAME  CPU%  TAGS  NOTE"]


def test_colour_only_when_enabled_and_after_padding():
    assert render.colour("ok", "green", False) == "ok"
    assert render.colour("ok", "green", True) == "\x1b[32mok\x1b[0m"
    assert render.colour("ok", None, True) == "ok"
    text = render.table(ROWS, COLUMNS, colourize=lambda column, value:
                        "red" if column == "NAME" else None)
    assert "\x1b[31mpi-kitchen\x1b[0m" in text
    assert "\x1b" not in text.splitlines()[0]    # headers stay plain


def test_csv_and_tsv_carry_the_same_rows():
    assert render.csv_text(ROWS, COLUMNS) == (
        "NAME,CPU%,TAGS,NOTE\npi-kitchen,12.5,\"a,b\",\nold-laptop,3,,line one line two\n")
    tsv = render.tsv_text([{"A": "x\ty", "B": 1}], ["A", "B"], header=False)
    assert tsv == "x y\t1\n"
    assert render.separated_text([{"A": "a|b"}], ["A"], "|") == "A\na b\n"


def test_json_text_is_indented_json():
    text = render.json_text({"a": [1, 2]})
    assert orjson.loads(text) == {"a": [1, 2]} and "\n  " in text and text.endswith("\n")


def test_age_uses_the_largest_unit():
    assert [render.age(s) for s in (0, 3, 59, 60, 299, 7200, 4 * 86400 + 5)] == \
        ["0s", "3s", "59s", "1m", "4m", "2h", "4d"]
    assert render.age(-5) == "0s" and render.age(None) == ""


def test_key_values_plain_for_scripts_and_aligned_for_people():
    pairs = [("a", 1), ("long_key", None)]
    assert render.key_values(pairs) == "a: 1\nlong_key:\n"
    assert render.key_values(pairs, align=True) == "a:        1\nlong_key:\n"


def test_text_that_reorders_or_hides_itself_is_shown_in_a_table_cell():
    """A device named "\u202egood" read as "doog" in `rc devices`, and one
    with a zero-width space looked like another: the bidi controls and
    invisible characters show as "?", Hebrew and Arabic letters and the
    joiners Persian needs as they are."""
    assert render.cell("\u202egood") == "?good"
    assert render.cell("a\u2067b\u2069c\u200ed\u200bz\ufeff") == "a?b?c?d?z?"
    assert render.cell("\u05e9\u05dc\u05d5\u05dd \u0633\u0644\u0627\u0645") == \
        "\u05e9\u05dc\u05d5\u05dd \u0633\u0644\u0627\u0645"
    assert render.cell("\u0645\u06cc\u200c\u062e\u0648\u0627\u0645") == \
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0645"
    text = render.table([{"DEVICE": "\u202epi-kitchen"}, {"DEVICE": "laptop"}], ["DEVICE"])
    assert "\u202e" not in text and "?pi-kitchen" in text


def test_control_characters_from_devices_never_reach_a_terminal():
    assert render.cell("evil\x1b[2Jname\x07") == "evil?[2Jname?"
    assert render.printable("line\n\ttab\x1b]0;title\x07") == "line\n\ttab?]0;title?"
    assert "\x1b" not in render.table([{"A": "\x1b[31mred"}], ["A"])


def test_bars_show_a_fraction_and_turn_red_when_full():
    assert render.bar(0.5, 10) == "[#####.....]"
    assert render.bar(None, 4) == "[    ]" and render.bar(7, 4) == "[####]"
    assert render.bar(0.95, 4, True) == "[\x1b[31m####\x1b[0m]"
    line = render.progress_line("slots 1/4", 0.25, 40)
    assert len(line) == 40 and line.endswith("25%") and line.startswith("slots 1/4 [")


def test_device_grid_fits_the_width_and_shows_every_device():
    cells = [{"device": "pi-%d" % n, "status": "online", "cpu": 0.5, "memory": None,
              "battery": 0.9, "active": 1, "slots": 2} for n in range(5)]
    lines = render.device_grid(cells, 80).splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert len(lines) == 2 * 7 and lines[1].count("|pi-") == 3    # three per row at 80
    text = "\n".join(lines)
    assert "BAT [" in text and " 90%|" in text
    assert "MEM [" in text and "n/a" in text and "tasks 1/2" in text
    assert render.device_grid([], 80) == ""
    narrow = render.device_grid(cells[:1], 10).splitlines()
    assert len(narrow) == 7 and all(len(line) == render.GRID_CELL_WIDTH for line in narrow)


def test_log_lines_are_coloured_by_level_only_on_a_terminal():
    record = {"time": 0, "program": "rc-web", "level": "error", "event": "bad",
              "why": "two words"}
    plain = render.log_line(record)
    assert plain.endswith('rc-web ERROR bad why="two words"')
    assert "\x1b[31mERROR\x1b[0m" in render.log_line(record, True)
    assert render.log_line("plain \x1b[2J text") == "plain ?[2J text"


def test_a_narrow_table_drops_its_last_columns_rather_than_cut_headers():
    rows = [{"DEVICE": "kitchen-pi_4", "STATUS": "online", "PLATFORM": "linux",
             "LAST_SEEN": "3s"}]
    lines = render.table(rows, ["DEVICE", "STATUS", "PLATFORM", "LAST_SEEN"], width=30)
    assert lines.splitlines() == ["DEVICE        STATUS  PLATFORM", "kitchen-pi_4  online  linux"]
    assert render.table(rows, ["DEVICE", "STATUS"], width=5).splitlines()[1] == "kitc…"
