"""Writes tests/slowest_files.txt from a run's JUnit XML: the test files
whose tests took 10 s or more in all, slowest first. conftest.py starts
them first, so that `make test`'s three processes do not end waiting on
one long file started last.

    .venv/bin/python -m pytest -n 3 --dist loadfile --junitxml=/tmp/run.xml
    .venv/bin/python tests/slowest_files.py /tmp/run.xml > tests/slowest_files.txt
"""
import collections
import sys
import xml.etree.ElementTree

SECONDS_WORTH_ORDERING = 10.0


def seconds_by_file(junit_xml):
    seconds = collections.Counter()
    for case in xml.etree.ElementTree.parse(junit_xml).iter("testcase"):
        module = case.get("classname").split(".")[1]      # tests.MODULE[.Class]
        seconds[module + ".py"] += float(case.get("time") or 0)
    return seconds


def main(junit_xml):
    print("# Test files, slowest first (tests/slowest_files.py wrote this from a")
    print("# fresh-clone make test run; seconds are its tests' summed durations).")
    for name, seconds in seconds_by_file(junit_xml).most_common():
        if seconds >= SECONDS_WORTH_ORDERING:
            print("%s %.0f" % (name, seconds))


if __name__ == "__main__":
    main(sys.argv[1])
