"""The --config help names an example key: it must be an option of that very command."""

import re

import pytest
import typer

from l2s.cli import app


@pytest.mark.parametrize("name", ["steer", "invert", "train", "bench", "speed", "distill"])
def test_config_help_example_is_an_option_of_the_command(name):
    """Catches invert/train/speed's --config help offering `num_images: 4`, a key they refuse
    (they have no --num-images)."""
    command = typer.main.get_command(app).commands[name]
    params = {p.name for p in command.params}
    (config,) = [p for p in command.params if "--config" in p.opts]
    keys = re.findall(r"\((\w+): ", config.help)
    assert keys, config.help
    for key in keys:
        assert key in params, f"{name} --config help names {key!r}, not one of its options"
