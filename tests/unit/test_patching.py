"""The one door for patches to DeepSpeed: version first, originals kept, undo."""
import pytest

from memlab.engine import patching as P


class Base:
    def method(self):
        return "base"


class Owner(Base):
    def own(self):
        return "own"


@pytest.fixture(autouse=True)
def clean():
    P.undo_all()
    yield
    P.undo_all()


def test_replace_keeps_the_original_and_undo_restores_own_and_inherited_attributes():
    previous_own = P.replace(Owner, "own", lambda self: "patched own")
    previous_inherited = P.replace(Owner, "method", lambda self: "patched method")
    assert Owner().own() == "patched own" and Owner().method() == "patched method"
    assert previous_own(Owner()) == "own" and previous_inherited(Owner()) == "base"
    assert P.installed() == ["Owner.own", "Owner.method"]
    P.undo_all()
    assert Owner().own() == "own" and Owner().method() == "base"
    assert "method" not in vars(Owner)  # the inherited one is inherited again, not copied down
    assert P.installed() == []


def test_a_missing_attribute_fails_loudly_and_patches_nothing():
    with pytest.raises(P.UnsupportedDeepSpeed, match="Owner.gone is missing"):
        P.replace(Owner, "gone", lambda self: None)
    assert P.installed() == []


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "1.0.0"])
def test_an_unknown_deepspeed_release_is_refused(version):
    with pytest.raises(P.UnsupportedDeepSpeed, match=f"found deepspeed {version}"):
        P.check_version(version)


@pytest.mark.parametrize("version", ["0.19.0", "0.19.8", "0.19.8+cpu"])
def test_the_known_releases_pass(version):
    P.check_version(version)


def test_the_installed_deepspeed_is_checked_before_the_first_patch(monkeypatch):
    import deepspeed

    monkeypatch.setattr(P, "_checked", [])
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(P.UnsupportedDeepSpeed):
        P.replace(Owner, "own", lambda self: None)
    assert Owner().own() == "own"


def test_add_gives_a_new_method_refuses_to_hide_one_and_is_undone():
    P.add(Owner, "extra", lambda self: "extra")
    assert Owner().extra() == "extra" and P.installed() == ["Owner.extra"]
    with pytest.raises(P.UnsupportedDeepSpeed, match="Owner.method exists"):
        P.add(Owner, "method", lambda self: None)
    P.undo_all()
    assert not hasattr(Owner, "extra")
