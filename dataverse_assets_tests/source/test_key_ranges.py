"""Primary-key ranges for parallel reads: pure arithmetic in SQL Server's GUID order."""

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataverse_assets.simulator.odata import guid_order_key
from dataverse_assets.source.key_ranges import (
    GUID_SPACE,
    KeyRange,
    guid_from_sql_value,
    guid_sql_value,
    key_ranges,
    range_query,
    ranged_watermark,
)
from dataverse_assets.source.query import PageQuery

guids = st.integers(0, GUID_SPACE - 1).map(lambda n: str(uuid.UUID(int=n)))


@given(guids)
def test_a_guids_sql_value_round_trips_and_orders_like_sql_server(guid: str) -> None:
    assert guid_from_sql_value(guid_sql_value(guid)) == guid
    assert guid_sql_value(guid) == int(guid_order_key(guid), 16)


def test_the_last_six_bytes_are_the_most_significant() -> None:
    small_tail = "ffffffff-ffff-ffff-ffff-000000000000"
    big_tail = "00000000-0000-0000-0000-000000000001"
    assert guid_sql_value(small_tail) < guid_sql_value(big_tail)


@given(count=st.integers(1, 40), bounds=st.lists(guids, min_size=2, max_size=2),
       keys=st.lists(guids, max_size=50))
def test_ranges_are_disjoint_cover_every_key_and_are_open_at_both_ends(
    count: int, bounds: list[str], keys: list[str]
) -> None:
    low, high = sorted(bounds, key=guid_sql_value)
    ranges = key_ranges(count, low, high)
    assert 1 <= len(ranges) <= count
    assert ranges[0].lower is None and ranges[-1].upper is None
    for left, right in zip(ranges, ranges[1:], strict=False):
        assert left.upper == right.lower
    for key in keys:  # inside or outside [low, high]: exactly one range holds it
        value = guid_sql_value(key)
        holders = [r for r in ranges
                   if (r.lower is None or guid_sql_value(r.lower) <= value)
                   and (r.upper is None or value < guid_sql_value(r.upper))]
        assert len(holders) == 1


def test_ranges_split_the_key_space_evenly() -> None:
    ranges = key_ranges(4)
    widths = [guid_sql_value(r.upper) for r in ranges[:-1]]
    assert widths == [GUID_SPACE // 4, GUID_SPACE // 2, 3 * GUID_SPACE // 4]
    assert ranges[1].lower == "00000000-0000-0000-0000-400000000000"


def test_a_range_query_keeps_the_filter_and_ends_its_order_with_the_key() -> None:
    query = PageQuery(filter="statecode eq 0 or statecode eq 1",
                      orderby=("modifiedon asc",), page_size=100)
    ranged = range_query(query, "accountid", KeyRange("00000000-0000-0000-0000-400000000000"))
    assert ranged.filter == ("(statecode eq 0 or statecode eq 1) and "
                             "(accountid ge 00000000-0000-0000-0000-400000000000)")
    assert ranged.orderby == ("modifiedon asc", "accountid asc")
    assert range_query(PageQuery(), "accountid", KeyRange()).orderby == ("accountid asc",)
    with pytest.raises(ValueError, match="change tracking"):
        range_query(PageQuery(track_changes=True), "accountid", KeyRange())


def test_the_ranged_watermark_is_the_earliest_range_maximum() -> None:
    assert ranged_watermark(["2025-03-01T00:00:00Z", None, "2025-01-01T00:00:00Z"]) == (
        "2025-01-01T00:00:00Z")
    assert ranged_watermark([None, None]) is None
