"""Bodies refused by shape before parsing: the count is right for any JSON, the scan is linear whatever
the body holds, and it never holds the interpreter lock for long."""

from __future__ import annotations

import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rge.serving import bodies
from rge.serving.protocol import APIError

TRICKY = st.text(alphabet=["a", '"', "\\", ",", "[", "]", "{", "}", " ", "é", "\n", "\u2028"], max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=3),
    max_leaves=25,
)


def values(value: object) -> int:
    if isinstance(value, list):
        return 1 + sum(map(values, value))
    if isinstance(value, dict):
        return 1 + sum(map(values, value.values()))
    return 1


def refused(body: bytes, limit: int) -> bool:
    try:
        bodies.check_shape(body, limit)
    except APIError:
        return True
    return False


@pytest.fixture
def tiny_slices(monkeypatch):
    monkeypatch.setattr(bodies, "SLICE", 3)  # slices cut strings, escapes and brackets everywhere


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture is the same for every example
@given(value=JSON, ascii_only=st.booleans(), limit=st.integers(0, 12))
def test_a_body_that_passes_holds_at_most_the_limit_plus_one_values(tiny_slices, value, ascii_only, limit):
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    count = values(value)
    if refused(body, limit):
        assert 2 * count > limit  # commas and openers outside strings: at most two per value
    else:
        assert count <= limit + 1  # n values need n - 1 commas


def test_the_scan_is_linear_and_lets_other_threads_run():
    def seconds(size: int) -> float:
        body = b'{"input": "' + b'\\"' * size + b'"}'  # escapes, and no closing quote on the inner ones
        started = time.perf_counter()
        bodies.check_shape(body, 1000)
        return time.perf_counter() - started

    seconds(1000)
    assert seconds(4_000_000) < 8 * seconds(1_000_000)  # linear: 4x; the quadratic scan was 16x and more
    gaps = []
    stop = threading.Event()

    def spin() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    spinner = threading.Thread(target=spin)
    spinner.start()
    started = time.perf_counter()
    bodies.check_shape(b'{"input": "' + b"\\n" * 8_000_000 + b'"}', 1000)
    total = time.perf_counter() - started
    stop.set()
    spinner.join()
    assert max(gaps) < total / 4  # slices: the lock is given up many times during the scan


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"[" + b"1," * 10_000 + b"1]", "more than 100 JSON values"), (b"{not json", "not valid JSON")],
)
def test_refusals_are_openai_errors(body, message):
    with pytest.raises(APIError) as raised:
        bodies.check_shape(body, 100)
        bodies.parse_json(body)
    assert raised.value.status == 400 and message in raised.value.message and raised.value.param is None
