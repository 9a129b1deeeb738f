import logging

import pytest

from nilai.outages import OutageLog, describe_error

logger = logging.getLogger("tests.outages")


def _raised_from_os_error() -> Exception:
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('10.0.0.7', 6379)")
        except OSError:
            raise RuntimeError("Error 111 connecting to 10.0.0.7:6379. Connect call failed.")  # noqa: B904 - chained implicitly, as redis-py does
    except RuntimeError as error:
        return error


def test_describe_error_names_the_type_the_message_and_the_os_error_it_wraps():
    assert describe_error(_raised_from_os_error()) == (
        "RuntimeError: Error 111 connecting to 10.0.0.7:6379. Connect call failed. "
        "(ConnectionRefusedError: Connection refused)"
    )


def test_describe_error_does_not_repeat_an_os_error_the_message_already_names():
    error = ConnectionRefusedError(111, "Connection refused")
    assert describe_error(error) == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_describe_error_masks_url_credentials_and_keeps_one_printable_line():
    error = ValueError(
        "cannot use redis://admin:hunter2@cache:6379/0 or rediss://:pw@h/1\x1b[31m\nsecond line"
    )
    text = describe_error(error)
    assert text == "ValueError: cannot use redis://***@cache:6379/0 or rediss://***@h/1?[31m"
    assert "hunter2" not in text


def test_describe_error_is_bounded_and_names_a_silent_error_by_type():
    assert len(describe_error(ValueError("x" * 10_000))) < 250
    assert describe_error(TimeoutError()) == "TimeoutError"


def test_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
):
    outage = OutageLog(logger, "the store", "requests wait")
    with caplog.at_level(logging.INFO, logger="tests.outages"):
        outage.answered()  # no outage: nothing to say
        for _ in range(3):
            outage.failed(ConnectionError("down"))
        assert outage.down
        outage.answered()
        outage.answered()
    started, ended = (record.getMessage() for record in caplog.records)
    assert started == "the store unavailable (ConnectionError: down); requests wait"
    assert ended.startswith("the store available again after ")
    assert ended.endswith("(3 failed attempts)")
    assert not outage.down


def test_an_attempt_begun_before_the_last_failure_does_not_end_the_outage(
    caplog: pytest.LogCaptureFixture,
):
    outage = OutageLog(logger, "the store", "requests wait")
    with caplog.at_level(logging.INFO, logger="tests.outages"):
        outage.failed(ConnectionError("down"))
        outage.answered(started=float("-inf"))  # on a connection opened before the outage
        assert outage.down
        outage.answered(started=float("inf"))
    assert not outage.down
    assert len(caplog.records) == 2


def test_an_attempt_begun_before_the_outage_ended_does_not_start_another(
    caplog: pytest.LogCaptureFixture,
):
    outage = OutageLog(logger, "the store", "requests wait")
    with caplog.at_level(logging.INFO, logger="tests.outages"):
        outage.failed(ConnectionError("down"))
        outage.answered()
        outage.failed(ConnectionError("down"), started=float("-inf"))  # still retrying then
        assert not outage.down
        outage.failed(ConnectionError("down again"), started=float("inf"))
        assert outage.down
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "down again" in messages[2]


class _Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_long_outage_is_recalled_at_the_reminder_cadence_not_at_every_failure(
    caplog: pytest.LogCaptureFixture,
):
    clock = _Clock()
    outage = OutageLog(
        logger, "discovery (redis://:***@cache:6379/0)", "routing on", reminder_s=60, clock=clock
    )
    with caplog.at_level(logging.INFO, logger="tests.outages"):
        for _ in range(150):  # one failure a second for 150 s
            outage.failed(ConnectionError("refused"))
            clock.now += 1
        outage.answered()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "discovery (redis://:***@cache:6379/0) unavailable (ConnectionError: refused); routing on",
        "discovery (redis://:***@cache:6379/0) still unavailable after 60 s "
        "(61 failed attempts; the last: ConnectionError: refused); routing on",
        "discovery (redis://:***@cache:6379/0) still unavailable after 120 s "
        "(121 failed attempts; the last: ConnectionError: refused); routing on",
        "discovery (redis://:***@cache:6379/0) available again after 150.0 s (150 failed attempts)",
    ]
