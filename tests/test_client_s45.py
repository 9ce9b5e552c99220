"""The Python client as users of ProcessPoolExecutor, Dask or Ray use it
(the forty-fifth session's brief): real programs' shapes on one shared
cluster. Each test names the fault it keeps fixed."""
import concurrent.futures
import functools
import glob
import operator
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cluster_harness import REPO, Cluster, for_the_client, online, wait_for
from rc import client

pytestmark = pytest.mark.e2e

CLIENT = os.path.join(REPO, "lib", "rc", "client.py")
# A client on Python 3.6 to 3.8, whose inspect gives a class's source from
# its `class` line on, without its decorators.
OLD_PYTHONS = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.[678].*/bin/python3")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("client_s45"))
    cluster.start()
    cluster.supervisorctl("stop", "rc-worker")
    cluster.start_worker("main", "--slots", "4")
    wait_for(lambda: "main" in online(cluster), 30, "the worker")
    yield for_the_client(cluster)
    cluster.stop()


@pytest.fixture(scope="module")
def executor(cluster):
    with client.Executor(cluster.url, cluster.token) as executor:
        yield executor


def script(cluster, tmp_path, source, python=sys.executable, timeout=120):
    """`source` run as a user's script (its __main__) beside a copy of
    client.py, as the dashboard serves it: (exit status, stdout, stderr)."""
    with open(CLIENT, "rb") as f, open(str(tmp_path / "client.py"), "wb") as copy:
        copy.write(f.read())
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(source))
    env = dict(os.environ, RC_URL=cluster.url, RC_TOKEN=cluster.token)
    done = subprocess.run([python, "-s", str(path)], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


# -- what a function may look like -----------------------------------------------------

def keyword_only(a, *rest, scale, **more):
    return (a, rest, scale, sorted(more.items()))


def test_a_function_with_a_keyword_only_argument_without_default_ships(executor):
    # Before: ast's kw_defaults holds None for `scale`, and the shipment
    # walked it: AttributeError: 'NoneType' object has no attribute '_fields'.
    assert executor.submit(keyword_only, 1, 2, scale=3, x=4).result(60) == \
        (1, (2,), 3, [("x", 4)])


MADE_BY_CALLS = """
    import collections, enum
    from client import Executor

    Point = collections.namedtuple(
        "Point", "x y")
    Shade = enum.Enum("Shade", "LIGHT DARK")

    def tagged(cls):
        cls.tag = "decorated"
        return cls

    @tagged
    class Box:
        pass

    def make(x):
        return Point(x, x + 1), Shade(x), Box.tag

    if __name__ == "__main__":
        with Executor() as executor:
            print(executor.submit(make, 1).result(60))
"""


@pytest.mark.parametrize("python", [sys.executable] + OLD_PYTHONS[-1:])
def test_classes_made_by_a_call_or_decorated_ship_with_the_function(cluster, tmp_path,
                                                                    python):
    # Before: a namedtuple or an Enum made by a call at the top level of the
    # script was refused (TypeError: "its source cannot be read (defined in
    # an interactive session...)"), and on Python 3.6-3.8 a decorated class
    # went without its decorators (a @dataclass had no __init__ there).
    status, out, err = script(cluster, tmp_path, MADE_BY_CALLS, python)
    assert status == 0, err
    assert out.strip() == "(Point(x=1, y=2), <Shade.LIGHT: 1>, 'decorated')"


PASSED_THROUGH = """
    import collections, enum
    from client import Executor

    Point = collections.namedtuple("Point", "x y")

    class Mode(enum.Enum):
        FAST = 1

    def norm(point):
        return abs(point.x) + abs(point.y)

    def same(value):
        return value

    if __name__ == "__main__":
        with Executor() as executor:
            print(list(executor.map(norm, [Point(1, -2), Point(3, 4)])))
            calls = [executor.submit(same, Mode.FAST) for _ in range(8)]    # packed
            print([call.result(60) for call in calls] == [Mode.FAST] * 8)
"""


def test_classes_of_the_script_that_only_the_arguments_name_ship(cluster, tmp_path):
    # Before: a namedtuple or Enum of the script given as an argument to a
    # function that never names its class did not reach the device:
    # AttributeError: Can't get attribute 'Point' on <module '__main__'>
    # (a ProcessPoolExecutor's process has the whole script).
    status, out, err = script(cluster, tmp_path, PASSED_THROUGH)
    assert status == 0, err
    assert out.split("\n")[:2] == ["[3, 7]", "True"]


SCRIPT_FUNCTION_TO_A_MODULE = """
    from client import Executor
    from helpers import apply

    def square(x):
        return x * x

    if __name__ == "__main__":
        with Executor() as executor:
            try:
                executor.submit(apply, square, 3)
            except TypeError as e:
                print(e)
"""


def test_a_function_of_the_script_given_to_a_modules_function_is_refused_at_submit(
        cluster, tmp_path):
    # Before: the call failed on the device, AttributeError: Can't get
    # attribute 'square' on <module '__main__'>, where the device's
    # __main__ holds helpers' definitions.
    (tmp_path / "helpers.py").write_text("def apply(f, x):\n    return f(x)\n")
    status, out, err = script(cluster, tmp_path, SCRIPT_FUNCTION_TO_A_MODULE)
    assert status == 0, err
    assert out.strip() == (
        "the arguments of helpers.apply name square of your script, which cannot go to a"
        " device with a function of helpers (a call takes one module of yours): define"
        " square in helpers, or the function in the script")


# -- waits -----------------------------------------------------------------------------

def nap_s45(seconds):
    time.sleep(seconds)
    return seconds


def test_a_map_that_times_out_cancels_the_call_it_waited_for(cluster, executor):
    # Before: the generator cancelled the calls after the one whose wait
    # timed out (or met Ctrl-C), and that one went on on its device, where
    # concurrent.futures' map cancels it too: nobody reads its result.
    started = time.time()
    results = executor.map(nap_s45, [60, 60], timeout=1, chunksize=1)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)

    def states():
        return [state for state, in cluster.db.execute(
            "SELECT state FROM tasks WHERE payload LIKE '%# nap_s45, 1 call%'"
            " AND created_at >= ? ORDER BY task_id", (started - 1,))]
    assert wait_for(lambda: states() == ["cancelled", "cancelled"], 30,
                    "the calls cancelled")


class Scale:
    def __init__(self, factor):
        self.factor = factor

    def times(self, number):
        return number * self.factor

    __call__ = times


def test_callables_that_are_not_functions_ship_pickled(executor):
    # Before: all refused at submit ("pass a function defined with def at the
    # top level of a module"), where ProcessPoolExecutor pickles them.
    scale = Scale(3)
    assert executor.submit(scale.times, 2).result(60) == 6
    assert executor.submit(scale, 4).result(60) == 12
    assert executor.submit(Scale.times, scale, 5).result(60) == 15
    assert executor.submit(Scale, 7).result(60).factor == 7
    assert list(executor.map(str.upper, ["a", "b"])) == ["A", "B"]
    assert executor.submit(operator.itemgetter(1), (5, 6)).result(60) == 6
    with pytest.raises(TypeError, match="cannot be pickled"):
        executor.submit(Scale(threading.Lock()), 1)
    with pytest.raises(TypeError, match="not callable"):
        executor.submit(42, 1)


def named(fn=0, self=0):
    return fn, self


def test_submit_passes_keywords_named_fn_and_self_to_the_function(executor):
    # Before: TypeError: Executor.submit() got multiple values for argument
    # 'fn', where ProcessPoolExecutor's submit(fn, /, *args, **kwargs) passes them.
    assert executor.submit(named, fn=1, self=2).result(60) == (1, 2)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'fn'"):
        executor.submit()


TABLE = list(range(100000))        # 400 KB in base64: over the 256 KiB of a task's code


def look_up(index):
    return TABLE[index]


def test_a_function_whose_globals_are_too_long_for_a_tasks_code_runs(executor):
    # Before: its global went pickled in the task's code, which rc-web
    # refused: ClusterError: python_exec code is over 262144 bytes (HTTP 400),
    # or the batch's 1 MiB (HTTP 413); now the function's source and
    # globals go as one input file that its tasks share.
    assert executor.submit(look_up, 5).result(60) == 5
    assert list(executor.map(look_up, [7, 99999], chunksize=1)) == [7, 99999]
    calls = [executor.submit(look_up, n) for n in range(40)]     # packed
    assert [call.result(60) for call in calls] == list(range(40))


def tagged(function):
    @functools.wraps(function)
    def wrapper(*args):
        return function(*args), "tagged"
    return wrapper


@tagged
def plus_one(number):
    return number + 1


@functools.lru_cache(maxsize=None)
def fibonacci(n):
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)


def fibonacci_of(n):
    return fibonacci(n)


def test_functions_decorated_at_the_top_level_ship_and_are_decorated_again(executor):
    # Before: a functools.wraps wrapper was refused as "a nested function or
    # closure", an lru_cache as not "a function defined with def at the top
    # level", and a function calling one failed on the device (Can't get
    # attribute 'fibonacci'), where ProcessPoolExecutor runs them all.
    assert executor.submit(plus_one, 1).result(60) == (2, "tagged")
    assert executor.submit(fibonacci, 30).result(60) == 832040
    assert executor.submit(fibonacci_of, 10).result(60) == 55
    assert executor.submit(operator.methodcaller("__call__", 12), fibonacci).result(60) == 144


LEVEL = {}


def set_level(value, scale=1):
    LEVEL["value"] = value * scale


class Starter:
    def __init__(self, value):
        self.value = value

    def __call__(self):
        LEVEL["value"] = self.value


def level(number):
    return LEVEL.get("value"), number


@pytest.mark.parametrize("initializer,expected", [
    (functools.partial(set_level, 3, scale=2), 6), (Starter(7), 7)])
def test_an_initializer_may_be_a_partial_or_a_callable_object(cluster, initializer, expected):
    # Before: refused with "pass a function defined with def at the top level
    # of a module", where ProcessPoolExecutor takes any picklable callable.
    with client.Executor(cluster.url, cluster.token, initializer=initializer) as executor:
        assert executor.submit(level, 1).result(60) == (expected, 1)


# -- annotations -----------------------------------------------------------------------

class Celsius(float):
    pass


def doubled(value: Celsius) -> Celsius:
    return value * 2


def test_a_class_named_only_in_annotations_ships(executor):
    # Before: def evaluates its annotations (before Python 3.14), and a
    # class or import they alone named was not sent: NameError: name
    # 'Celsius' is not defined, on the device.
    assert executor.submit(doubled, 1.5).result(60) == 3.0


FUTURE_ANNOTATIONS = """
    from __future__ import annotations
    import typing
    from client import Executor
    if typing.TYPE_CHECKING:
        from decimal import Decimal

    def label(amount: Decimal | None) -> dict[str, Decimal]:
        return {"amount": amount}

    if __name__ == "__main__":
        with Executor() as executor:
            print(executor.submit(label, 2).result(60))
"""


def test_a_script_with_future_annotations_keeps_them_unevaluated(cluster, tmp_path):
    # Before: its functions were compiled on the device without the
    # script's `from __future__ import annotations`, which evaluated their
    # annotations: NameError for what only typing.TYPE_CHECKING imports.
    status, out, err = script(cluster, tmp_path, FUTURE_ANNOTATIONS)
    assert status == 0, err
    assert out.strip() == "{'amount': 2}"


def fails_at_five(number):
    if number == 5:
        raise ValueError("five")
    return number


def test_a_map_gives_the_values_before_the_first_call_that_raised(executor):
    # Before: a chunk whose call raised gave none of its values, though the
    # calls before it had run: ProcessPoolExecutor's map (chunksize 1) gives
    # 0 to 4, then raises.
    got = []
    with pytest.raises(ValueError, match="five"):
        for value in executor.map(fails_at_five, range(8), chunksize=8):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]


def count_lines(name):
    with open(name) as f:
        return len(f.readlines())


def test_a_file_of_this_machine_the_call_cannot_open_is_named_with_the_fix(
        cluster, executor, tmp_path, monkeypatch):
    # Before: a bare "No such file or directory: 'table.csv'", where a
    # ProcessPoolExecutor's process opens the file beside the script.
    monkeypatch.chdir(str(tmp_path))
    (tmp_path / "table.csv").write_text("a\nb\n")
    with pytest.raises(FileNotFoundError, match=r"table.csv is a file of this machine: "
                       r"Executor\(inputs=\['table.csv'\]\)"):
        executor.submit(count_lines, "table.csv").result(60)
    with pytest.raises(FileNotFoundError) as missing:
        executor.submit(count_lines, "nowhere.csv").result(60)
    assert "this machine" not in str(missing.value)
    with client.Executor(cluster.url, cluster.token, inputs=["table.csv"]) as sending:
        assert sending.submit(count_lines, "table.csv").result(60) == 2


def test_a_maps_timeout_counts_from_the_call_to_map(executor, monkeypatch):
    # Before: from the first next(): a program that did other work after
    # map() waited `timeout` more, where concurrent.futures' map's timeout
    # counts "from the original call to Executor.map()".
    waits = []
    result = client.TaskFuture.result

    def noted(future, timeout=None):
        waits.append(timeout)
        return result(future, timeout)
    monkeypatch.setattr(client.TaskFuture, "result", noted)
    results = executor.map(nap_s45, [60], timeout=0.5)
    time.sleep(0.6)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    assert waits == [0.0]       # the time left when it was asked: none


# -- files -----------------------------------------------------------------------------

def test_an_empty_file_is_put_and_given_as_an_input(cluster, tmp_path):
    # Before: put() of an empty file on the disk sent it with
    # socket.sendfile(count=0): ValueError: count must be a positive integer.
    empty = tmp_path / "marker"
    empty.write_bytes(b"")
    with client.Cluster(cluster.url, cluster.token) as connection:
        stored = connection.put(str(empty))
        assert stored["size"] == 0
        assert connection.get(stored["sha256"]) == b""
        assert connection.submit("shell", "wc -c < marker",
                                 inputs=[str(empty)]).result(60).strip() == "0"
