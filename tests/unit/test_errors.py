"""One error root: input errors (exit 2) apart from run failures and bugs."""
import pytest

import memlab
from memlab import cli
from memlab.engine.memascend.direct_storage import RegionFull
from memlab.engine.probes import UnsupportedDeepSpeed
from memlab.errors import InputError, MemlabError, RunError
from memlab.knobs import KnobError
from memlab.models import ModelSpecError
from memlab.oplocks import StaleOpLock
from memlab.runs import RunStoreError
from memlab.sizing import SizingError


@pytest.mark.parametrize("cls, branch, old_base", [
    (KnobError, InputError, ValueError),
    (ModelSpecError, InputError, ValueError),
    (SizingError, InputError, ValueError),
    (RunStoreError, InputError, ValueError),
    (StaleOpLock, RunError, RuntimeError),
    (UnsupportedDeepSpeed, RunError, RuntimeError),
    (RegionFull, RunError, OSError),
])
def test_every_error_has_one_root_and_keeps_its_old_base(cls, branch, old_base):
    assert issubclass(cls, branch) and issubclass(cls, MemlabError) and issubclass(cls, old_base)


def test_the_root_and_the_input_branch_are_public():
    assert memlab.MemlabError is MemlabError and memlab.InputError is InputError
    assert {"MemlabError", "InputError"} <= set(memlab.__all__)
    assert issubclass(InputError, ValueError) and issubclass(RunError, RuntimeError)
    assert not issubclass(RunError, InputError)


def test_region_full_is_still_an_os_error_with_its_message():
    error = RegionFull("memascend.storage_device /dev/x: 10 bytes needed, 5 available")
    assert str(error) == "memascend.storage_device /dev/x: 10 bytes needed, 5 available"


def test_cli_bad_input_exits_2_in_one_line(capsys):
    assert cli.main(["estimate", "--model", "tiny-lama"]) == 2
    assert capsys.readouterr().err.startswith("memlab: error: ")
    assert cli.main(["fit", "--model", "tiny-llama"]) == 2  # no budget: SizingError
    assert "budget" in capsys.readouterr().err


def test_cli_an_os_error_on_the_users_path_is_bad_input(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["run", "--out", str(tmp_path / "file" / "store")]) == 2  # the store cannot be made
    assert capsys.readouterr().err.startswith("memlab: error: ")
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


@pytest.mark.parametrize("error", [ValueError("a bug"), OSError("a bug"), KeyError("a bug")])
def test_cli_a_bug_is_not_reported_as_bad_input(monkeypatch, error):
    def broken(args):
        raise error

    monkeypatch.setattr(cli, "cmd_estimate", broken)
    with pytest.raises(type(error)):
        cli.main(["estimate", "--model", "tiny-llama"])
