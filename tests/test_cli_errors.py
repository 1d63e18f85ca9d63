"""The CLI turns every l2s error into one line, in one place (l2s.cli.output.user_errors)."""

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from l2s.cli.output import user_errors
from l2s.errors import L2SError

CLI = Path(__file__).resolve().parents[1] / "l2s" / "cli"


def _app(error: Exception) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @user_errors
    def fail() -> None:
        raise error

    return app


def test_any_l2s_error_is_one_line_and_exit_2_and_other_exceptions_stay_bugs():
    """Was: each command listed the error classes it caught, so an error class missing from
    a list (a new one, or one raised deeper than the command expected) became a traceback."""

    class NewError(L2SError, RuntimeError):
        pass

    r = CliRunner().invoke(_app(NewError("x " * 150 + "[fix] it")), [])
    assert r.exit_code == 2
    # one line however long (no wrapping), brackets kept
    assert r.output.count("\n") == 1 and r.output.rstrip().endswith("[fix] it")
    r = CliRunner().invoke(_app(ValueError("a bug")), [])
    assert isinstance(r.exception, ValueError)  # not swallowed into a user error


def test_no_command_lists_its_own_errors():
    """Was: `_errors()` tuples per command and speed's bare `ValueError` catch."""
    for f in sorted(CLI.glob("*.py")):
        text = f.read_text()
        assert "user_errors(" not in text.replace("def user_errors(", ""), f.name
        assert "def _errors(" not in text, f.name


def test_speed_mistakes_are_l2s_errors():
    """Was: speed raised bare ValueErrors (which its CLI caught with a bare `except
    ValueError`, hiding bugs of that type too)."""
    from l2s.steering.speed import SpeedConfig, run_speed

    with pytest.raises(L2SError, match="--repeats must be >= 1"):
        run_speed(SpeedConfig(model="toy", repeats=0))
    with pytest.raises(L2SError, match="states no steerable relation"):
        run_speed(SpeedConfig(model="toy", prompt="a circle and a square", repeats=1))


def test_settings_and_inversion_options_raise_config_errors():
    from l2s.errors import ConfigError
    from l2s.inversion.loop import InversionConfig
    from l2s.steering.loop import SteerSettings

    for bad in ({"optimizer": "bogus"}, {"relation_schedule": "bogus"}, {"steer_until": 0},
                {"steer_from": -1}, {"compile": "bogus"}):
        with pytest.raises(ConfigError):
            SteerSettings(**bad)
    for bad in ({"method": "bogus"}, {"record_steps": (99,)}):
        with pytest.raises(ConfigError):
            InversionConfig(**bad)
