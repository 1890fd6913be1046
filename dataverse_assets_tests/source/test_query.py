from urllib.parse import quote

import pytest

from dataverse_assets.source.query import (
    MAX_IDS_PER_FILTER,
    PageQuery,
    datetime_literal,
    id_filter,
    id_filter_batches,
    modified_since_filter,
    string_literal,
)


def test_quotes_inside_string_literals_are_doubled():
    assert string_literal("O'Bryan") == "'O''Bryan'"
    assert string_literal("''") == "''''''"


def test_id_filter_escapes_every_id():
    expression = id_filter("accountid", ["a'b", "c"])
    assert expression == "accountid eq 'a''b' or accountid eq 'c'"


def test_ids_are_batched_at_most_fifty_per_filter():
    ids = [f"{i:08d}-0000-0000-0000-000000000000" for i in range(121)]
    batches = list(id_filter_batches("contactid", ids))
    assert [len(b) for b, _ in batches] == [50, 50, 21]
    assert all(expr.count(" or ") == len(b) - 1 for b, expr in batches)
    assert [i for b, _ in batches for i in b] == ids
    with pytest.raises(ValueError):
        list(id_filter_batches("contactid", ids, batch_size=MAX_IDS_PER_FILTER + 1))


def test_datetimes_are_unquoted_utc_literals():
    assert datetime_literal("2021-04-28T15:19:30Z") == "2021-04-28T15:19:30Z"
    assert datetime_literal("2021-04-28T17:19:30.250+02:00") == "2021-04-28T15:19:30.25Z"
    assert modified_since_filter(None) is None
    assert modified_since_filter("2021-04-28T15:19:30Z") == "modifiedon ge 2021-04-28T15:19:30Z"
    assert modified_since_filter("2021-04-28T15:19:30Z", inclusive=False) == (
        "modifiedon gt 2021-04-28T15:19:30Z")


def test_query_parameters_are_url_encoded_by_the_client():
    query = PageQuery(select=("name", "accountid"), filter="name eq 'A&B #1+'",
                      orderby=("modifiedon asc", "accountid asc"), page_size=500)
    import httpx

    url = str(httpx.URL("https://org.example/api/data/v9.2/accounts", params=query.params()))
    assert "A%26B" in url and "%231" in url and "%2B" in url
    assert quote("'") not in url or "'" in httpx.URL(url).params["$filter"]
    assert httpx.URL(url).params["$filter"] == "name eq 'A&B #1+'"
    assert query.prefer() == "odata.maxpagesize=500"
