"""The command line: its name (``python -m training`` in a clone, ``hear-brainsoundnet`` installed),
the commands it lists, and the commands it hands to their own modules."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from training import cli

CLI_SOURCE = Path(cli.__file__)


def test_a_clone_is_python_m_training(capsys):
    assert cli.PROG == "python -m training"
    help_text = " ".join(cli.build_parser().format_help().split())  # argparse wraps lines
    assert help_text.startswith("usage: python -m training ")
    for command in ("main", "generate", "train", "publish", "brain-score", "evaluate", "hear-eval"):
        assert command in help_text
    assert "python -m training train CONFIG [--set KEY=VALUE ...]" in help_text
    with pytest.raises(SystemExit) as done:
        cli.main(["main", "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m training main ")


def test_the_installed_package_is_the_console_script():
    """Imported as ``hear_brainsoundnet.training.cli`` (what the console script of setup.cfg
    runs), the command line names itself ``hear-brainsoundnet``, in its commands' help too."""
    spec = importlib.util.spec_from_file_location("hear_brainsoundnet.training.cli", CLI_SOURCE)
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert installed.PROG == "hear-brainsoundnet"
    help_text = " ".join(installed.build_parser().format_help().split())
    assert help_text.startswith("usage: hear-brainsoundnet ")
    assert "hear-brainsoundnet brain-score MODULE --config CONFIG" in help_text
    assert "python -m" not in help_text


def test_brain_score_through_the_command_line_names_it(capsys):
    """``python -m training brain-score`` hands over to training.brain_score, whose usage then
    names the command as typed (it used to say ``python -m training.brain_score``)."""
    with pytest.raises(SystemExit) as done:
        cli.main(["brain-score", "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m training brain-score ")
    with pytest.raises(SystemExit) as done:
        cli.main(["brain-score", ":log-mel"])  # --config is required
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert "usage: python -m training brain-score" in error and "--config" in error


def test_brain_score_on_its_own_names_its_module(capsys):
    from training import brain_score

    with pytest.raises(SystemExit):
        brain_score.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m training.brain_score ")


@pytest.mark.parametrize("command", sorted(cli.DELEGATED))
def test_every_delegated_command_names_itself_in_its_usage(command, capsys):
    """`python -m training train --help` says "usage: python -m training train", not the module."""
    assert callable(importlib.import_module(cli.DELEGATED[command], cli.__package__).main)
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m training {command} ")


def test_an_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["trian"])
    assert done.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err
