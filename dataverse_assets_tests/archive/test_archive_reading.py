"""Reading an archived change set page by page: order, early stops, and a compaction that
happens while the pages are being read (the next page is read ahead on a thread); in a folder
and on S3."""

import orjson

from dataverse_assets.archive.change_sets import ChangeSetArchive
from dataverse_assets.archive.compacted import compact_change_set


def archive_with_pages(root, pages: int) -> tuple[ChangeSetArchive, list[bytes]]:
    archive = ChangeSetArchive(root, "things", "20260101T000000Z")
    archive.start()
    bodies = [orjson.dumps({"value": [{"thingid": f"id-{page}-{n}", "text": "x" * 500}
                                      for n in range(200)]}) for page in range(1, pages + 1)]
    for number, body in enumerate(bodies, start=1):
        archive.write_page(number, body)
    archive.finish({"mode": "full", "summary": {},
                    "pages": [{"kind": "snapshot", "shape": "collection"}] * pages})
    return archive, bodies


def test_pages_come_in_order_and_a_reader_may_stop_early(archive_root):
    archive, bodies = archive_with_pages(archive_root, 7)
    assert list(archive.iter_page_bodies()) == bodies
    reader = archive.iter_page_bodies()
    assert [next(reader), next(reader)] == bodies[:2]
    reader.close()  # stops with one page read ahead: nothing left running, no error
    assert list(archive.iter_page_bodies()) == bodies


def test_a_compaction_during_the_read_is_picked_up_from_the_parquet_parts(archive_root):
    archive, bodies = archive_with_pages(archive_root, 6)
    reader = archive.iter_page_bodies()
    first = [next(reader), next(reader)]
    compact_change_set(archive)  # deletes the page files, the third included
    assert not archive.page_names() and archive.is_compacted()
    assert first + list(reader) == bodies
