"""memlab.units: one meaning of every size suffix; the byte formatters."""
import pytest

from memlab import InputError, MemlabError
from memlab.knobs import Knobs
from memlab.units import GiB, KiB, MiB, TiB, bytes_unit, format_bytes, format_in, parse_bytes


@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * GiB), ("6G", 6 * GiB), ("6g", 6 * GiB), ("1.5 gib", int(1.5 * GiB)),
    ("512MiB", 512 * MiB), ("512M", 512 * MiB), ("4k", 4 * KiB), ("2T", 2 * TiB),
    ("512 MB", 512 * 10**6), ("64GB", 64 * 10**9), ("1kB", 1000), ("1TB", 10**12),  # SI only when spelled out
    ("100", 100), ("100B", 100), ("1e3", 1000), (2**30, GiB), (1.5, 1),
])
def test_parse_bytes_is_binary_unless_si_is_spelled_out(text, expected):
    assert parse_bytes(text) == expected


def test_a_bare_number_counts_the_callers_unit():
    assert parse_bytes("128", unit=GiB) == 128 * GiB
    assert parse_bytes(2, unit=GiB) == 2 * GiB
    assert parse_bytes("64G", unit=GiB) == parse_bytes("64G") == 64 * GiB  # --ram 64G is --budget 64G


@pytest.mark.parametrize("text, reason", [
    ("lots", "must be a size such as"), ("3x", "must be a size such as"), ("", "must be a size such as"),
    (True, "not a boolean"), ("0", "positive"), ("-5GiB", "positive"), (-1, "positive"), (float("nan"), "positive"),
])
def test_parse_bytes_refuses_with_the_reason(text, reason):
    with pytest.raises(InputError, match=reason) as info:
        parse_bytes(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemlabError)


def test_the_budget_knob_and_the_cli_read_sizes_alike():
    from memlab.cli import _gib

    resolved = Knobs({"run.budget": "64G"})["run.budget"]
    assert resolved == _gib("64G") == _gib("64") == 64 * GiB
    assert Knobs({"run.budget": "64GB"})["run.budget"] == _gib("64GB") == 64 * 10**9


def test_format_bytes():
    assert format_bytes(None) == "–"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 * MiB) == "5.0 MiB"
    assert format_bytes(3 * GiB) == "3.00 GiB"
    assert format_bytes(-2 * MiB) == "-2.0 MiB"
    assert format_bytes(512, smallest="MiB") == "0.0 MiB"  # the estimate table's unit floor
    assert format_in(3 * MiB) == "3.0 MiB" and format_in(3.4 * MiB, "MiB", 0) == "3 MiB"
    assert bytes_unit(GiB - 1) == (MiB, "MiB") and bytes_unit(GiB) == (GiB, "GiB")


def test_views_format_with_the_same_functions():
    from memlab.sizing import _fmt
    from memlab.views import figures

    assert figures.format_bytes is format_bytes and figures.bytes_unit is bytes_unit
    assert _fmt(3 * GiB) == "3.00 GiB" and _fmt(None) == "–" and _fmt(1000) == "0.0 MiB"
