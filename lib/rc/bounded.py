"""Whole numbers from outside (a query string, a path, a JSON body, a command
line) checked before they reach SQLite, which stores at most 64 signed bits
and raises OverflowError past them: a bad number is the sender's error,
named in a ValueError, never a crash or a 500."""
import re

LARGEST = 2 ** 63 - 1           # SQLite's largest INTEGER
SMALLEST = -2 ** 63
# ASCII digits only: str.isdigit() and int() also take "²" and "١٢".
DIGITS = re.compile(r"[+-]?[0-9]{1,30}")
SECONDS = re.compile(r"[0-9]{1,10}(\.[0-9]{1,9})?")
JSON_DEPTH = 64                 # nesting a checked JSON value may have


def whole(text, name, low=0, high=LARGEST):
    """`text` as an int from `low` to `high`, or a ValueError naming `name`."""
    text = text.strip() if isinstance(text, str) else text
    if not isinstance(text, str) or not DIGITS.fullmatch(text):
        raise ValueError("%s must be a whole number, not %r" % (name, shown(text)))
    return in_range(int(text), name, low, high)


def seconds(value, name, low=0.0, high=3600.0):
    """A duration from outside (a number, or its text as in ?wait=1.5) as a
    float from `low` to `high`, or a ValueError naming `name`: no NaN, no
    infinity, no "1e999"."""
    if isinstance(value, str) and SECONDS.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not low <= value <= high:
        raise ValueError("%s must be a number of seconds from %g to %g, not %r"
                         % (name, low, high, shown(value)))
    return float(value)


def in_range(value, name, low=0, high=LARGEST):
    if not low <= value <= high:
        raise ValueError("%s must be from %d to %d, not %s" % (name, low, high, shown(value)))
    return value


def check_json(value, name="body", depth=0):
    """Every integer inside a decoded JSON value fits SQLite; a ValueError
    names the first that does not ("depends_on[0]")."""
    if depth > JSON_DEPTH:
        raise ValueError("%s is nested deeper than %d levels" % (name, JSON_DEPTH))
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        in_range(value, name, SMALLEST, LARGEST)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json(item, "%s.%s" % (name, key) if name != "body" else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json(item, "%s[%d]" % (name, i), depth + 1)
    return value


def shown(value, limit=40):
    """A bad value as a message shows it: short, whatever its length."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"
