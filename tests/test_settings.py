"""settings.py: the shared options, importable (and so --help-able) without torch."""

import subprocess
import sys
from pathlib import Path

import settings

ROOT = Path(__file__).resolve().parents[1]


def test_settings_imports_no_torch():
    code = "import settings, sys; assert 'torch' not in sys.modules, 'settings imported torch'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_models_reads_the_offered_names_from_settings():
    import models

    assert models.OFFLINE_PRESETS is settings.OFFLINE_PRESETS
    parser = settings.training_parser("test", 1e-4, "learning rate")
    assert parser.get_default("precision") == settings.DEFAULT_PRECISION
    for preset in settings.OFFLINE_PRESETS:
        assert preset in parser.format_help().replace("\n", " ").replace("  ", " ")
