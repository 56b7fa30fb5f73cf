"""Every option of every script explains itself in --help and shows its default."""
from __future__ import annotations

import argparse

import pytest
from _scripts import ROOT, script_parser

SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))


def test_the_scripts_are_found():
    assert {"scripts/generate_weights.py", "scripts/build_zoo.py", "scripts/train_vae.py",
            "scripts/interpolate.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_and_shows_its_default(script):
    parser = script_parser(script)
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert options, script
    for action in options:
        name = "/".join(action.option_strings) or action.dest
        if action.help == argparse.SUPPRESS:
            continue  # hidden on purpose (internal flags)
        assert action.help and action.help.strip(), f"{script}: {name} has no help text"
        text = formatter._expand_help(action)
        has_default = not any(action.default is v for v in (None, False)) and not action.required
        if has_default:
            assert "default" in text, f"{script}: {name} does not show its default {action.default!r}: {text!r}"


def test_train_vae_epochs_default_matches_the_readme():
    parser = script_parser("scripts/train_vae.py")
    assert parser.get_default("max_epochs") == 30


def test_train_vae_help_names_the_readme_training_of_the_shipped_vae():
    """The help's account of the shipped VAE matches the README's command (--max-epochs 4 --max-steps 4000)."""
    import re

    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "train_vae.py" in line and "weightgen/assets/vae" in line)
    epochs, steps = re.search(r"--max-epochs (\d+)", command)[1], re.search(r"--max-steps (\d+)", command)[1]
    parser = script_parser("scripts/train_vae.py")
    text = next(a.help for a in parser._actions if a.dest == "max_epochs")
    assert f"{epochs} epochs" in text and f"{int(steps):,} steps" in text, text


def test_build_zoo_runs_one_thread_by_default_and_says_what_quick_costs():
    parser = script_parser("scripts/build_zoo.py")
    assert parser.get_default("threads") == 1  # many threads on a many-core CPU cost ~10x the CPU time
    quick = next(a.help for a in parser._actions if a.dest == "quick")
    assert "< 1 min" not in quick and "CPU-s" in quick
