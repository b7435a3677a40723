"""Every flag explains itself: help text and section in the field's metadata, rendered by
``--help`` and, identically, by the README's flag reference (``configs/flag_table.py``)."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import finish

from configs.cli import build_parser, flag_docs, parse_args
from configs.flag_table import BEGIN, END, markdown
from configs.training_config import PRESETS, SECTIONS, TrainingConfig

REPO = Path(__file__).resolve().parent.parent


def _words(text: str) -> str:
    """Text with argparse's line wrapping undone."""
    return " ".join(text.split())


@pytest.mark.parametrize("field", fields(TrainingConfig), ids=lambda f: f.name)
def test_every_field_has_help_text_and_a_section(field):
    assert field.metadata.get("help", "").strip(), f"{field.name} has no help text"
    assert field.metadata.get("section") in [s.title for s in SECTIONS], field.name


def test_help_shows_every_flag_with_its_text_default_and_range_by_section():
    text = _words(build_parser().format_help())
    for doc in flag_docs():
        assert all(name in text for name in doc.names), doc.names
        assert _words(doc.help) in text, doc.names
    for section in SECTIONS:
        assert f"{section.title}:" in text
    assert ("--max-files MAX_FILES use only the first N data files, in path order "
            "[>= 0 (0 = all); default: 0]") in text
    assert "--compile, --no-compile" in text


def test_help_names_the_chosen_presets_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", "production", "--help"])
    assert exit_info.value.code == 0
    text = _words(capsys.readouterr().out)
    assert "[>= 1; default: 200; --config production: 10000]" in text  # --max-steps
    assert "[default: off; --config production: on]" in text  # --compile


def test_readme_flag_reference_is_the_generated_tables():
    readme = (REPO / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, "markers missing in README.md"
    held = readme[readme.index(BEGIN):readme.index(END) + len(END)]
    assert held == markdown(), ("README.md's flag reference is stale: replace it with the "
                                "output of `python -m configs.flag_table`")


def test_recorded_configs_still_load_flat():
    """Checkpoints record the flat dict; the metadata adds no key and loads any of them."""
    for config in PRESETS.values():
        recorded = config.record()
        assert list(recorded) == [f.name for f in fields(TrainingConfig)]
        assert TrainingConfig(**recorded) == config


def test_help_is_quick_and_imports_no_torch():
    probe = ("import runpy, sys\nsys.argv = ['train.py', '--help']\n"
             "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
             "except SystemExit as stop:\n    assert stop.code == 0\n"
             "print('torch' in sys.modules)")
    done = finish([sys.executable, "-c", probe], cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("False"), done.stdout[-300:]
