"""`directpo.console`: the `directpo` logger prints `[directpo] msg` and `[directpo] warning: msg` on
stderr (rank 0 only), and a library user reconfigures it with `logging` like any other."""
from __future__ import annotations

import logging

import pytest

from directpo import console
from directpo.console import log, warn


@pytest.fixture(autouse=True)
def logger(monkeypatch):
    """The `directpo` logger, as the test found it afterwards (level, handlers, propagate)."""
    monkeypatch.delenv("RANK", raising=False)
    lg = logging.getLogger("directpo")
    log("set up")  # configured once, at the first line
    saved = lg.level, list(lg.handlers), lg.propagate
    yield lg
    lg.setLevel(saved[0])
    lg.handlers[:] = saved[1]
    lg.propagate = saved[2]


def test_lines_keep_the_console_format(capsys):
    capsys.readouterr()
    log("step 10/100: loss 0.6931")
    warn("kto: the training data has only desirable examples")
    log("50% done, %s kept")  # no %-formatting of the message
    log("round 2 ...", prefix="bench")
    warn("disk nearly full", prefix="directpo online")
    assert capsys.readouterr().err.splitlines() == [
        "[directpo] step 10/100: loss 0.6931",
        "[directpo] warning: kto: the training data has only desirable examples",
        "[directpo] 50% done, %s kept",
        "[bench] round 2 ...",
        "[directpo online] warning: disk nearly full",
    ]


def test_log_and_warn_are_info_and_warning_records_of_the_directpo_logger(logger):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    log("progress")
    warn("careful")
    log("warning: written by hand")  # the older call sites: a WARNING too, printed the same
    assert [(r.name, r.levelno, r.getMessage()) for r in records] == [
        ("directpo", logging.INFO, "progress"), ("directpo", logging.WARNING, "careful"),
        ("directpo", logging.WARNING, "written by hand")]


def test_the_handler_is_set_up_once_on_stderr_without_propagation(logger, capsys):
    assert logger.handlers.count(console.HANDLER) == 1 and logger.level == logging.INFO
    assert logger.propagate is False  # an application's root handler does not print every line twice
    log("again")
    assert logger.handlers.count(console.HANDLER) == 1
    assert capsys.readouterr().err.endswith("[directpo] again\n")


def test_a_user_silences_progress_lines_and_keeps_warnings(logger, capsys):
    capsys.readouterr()
    logging.getLogger("directpo").setLevel(logging.WARNING)
    log("step 1/10")
    warn("loss is not finite")
    assert capsys.readouterr().err == "[directpo] warning: loss is not finite\n"
    logging.getLogger("directpo").setLevel(logging.ERROR)
    warn("quiet now")
    assert capsys.readouterr().err == ""


def test_a_user_routes_the_lines_through_their_own_logging(logger, capsys):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        capsys.readouterr()
        logger.removeHandler(console.HANDLER)
        logger.propagate = True
        log("through the root logger")
    finally:
        root.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["through the root logger"]
    assert "[directpo]" not in capsys.readouterr().err


def test_only_rank_0_prints_under_torchrun(monkeypatch, capsys):
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")
    log("from rank 1")
    warn("from rank 1")
    monkeypatch.setenv("RANK", "0")
    log("from rank 0")
    assert capsys.readouterr().err == "[directpo] from rank 0\n"
