"""The locked environment: what set-up installs is exactly requirements.lock,
and Binder's requirements are generated from it (scripts/lock.py)."""
import os
import subprocess
import sys

from helpers import ROOT, SCRIPTS

sys.path.insert(0, SCRIPTS)
import lock  # noqa: E402


def test_this_environment_is_exactly_the_lock():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "lock.py"), "check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_lock_pins_every_package_exactly_and_torch_to_the_cpu_release():
    pins = lock.read_lock()  # refuses anything but name==version
    assert pins["torch"] == "2.13.0"
    for name in ("deepspeed", "transformers", "pip", "setuptools", "pytest", "packaging"):
        assert name in pins, name


def test_binder_requirements_are_generated_from_the_lock():
    with open(lock.BINDER) as f:
        assert f.read() == lock.binder_text(lock.read_lock()), "run `.venv/bin/python scripts/lock.py binder`"


def test_binder_holds_what_memlab_needs_at_run_time_and_no_test_tool():
    pins = lock.binder_pins(lock.read_lock())
    assert {"torch", "deepspeed", "transformers", "ipywidgets", "jupytext"} <= set(pins)
    assert not {"pytest", "playwright", "hypothesis"} & set(pins)
