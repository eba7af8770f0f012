"""Fixtures every test folder shares. Module-scoped variants (one lab for a
file's runs) are defined where a file needs them."""
import pytest

from memlab import Lab, oplocks

# A test that loads a DeepSpeed op in its own process (not through a worker) loads the ones set-up built,
# from where set-up built them: unset, torch would compile them again in its default cache, per machine.
oplocks.use_extensions_root()


@pytest.fixture
def lab(tmp_path):
    """A lab with a store of the test's own."""
    return Lab(tmp_path / "store")


@pytest.fixture
def swap(tmp_path):
    """An empty swap root of the test's own (runs make their folders in it)."""
    root = tmp_path / "swap"
    root.mkdir()
    return root
