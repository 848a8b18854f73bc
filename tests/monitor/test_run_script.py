"""monitor.errors.run_script: how the `python -m` benchmarks end."""

from __future__ import annotations

import pytest

from monitor.errors import UsageError, run_script


def test_a_user_mistake_is_one_line_and_exit_code_2(capsys):
    def main():
        raise UsageError("bench-alarms/data-seed0: cannot write the data set")

    with pytest.raises(SystemExit) as exit_:
        run_script(main, "python -m train.alarm_bench")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "python -m train.alarm_bench: error: bench-alarms/data-seed0: cannot write the data set\n"


def test_main_s_return_code_is_the_exit_code_and_other_errors_propagate():
    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: 0, "prog")
    assert exit_.value.code == 0

    def broken():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):  # a traceback for what is not a user mistake
        run_script(broken, "prog")
