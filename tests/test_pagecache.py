"""Page-cache residency (mincore) and eviction (posix_fadvise DONTNEED) of checkpoint files, and the meter's line."""

from __future__ import annotations

import mmap
import os

import pytest

from faasmoe.metering.meter import Meter
from faasmoe.metering.pagecache import FOLIO_MAX, PAGE, evict, resident_bytes, resident_range

MiB = 2**20


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(8 * MiB + 123))  # not a whole number of pages
    evict(path)
    if resident_bytes([path]) != 0:
        pytest.skip("this file system does not drop pages on POSIX_FADV_DONTNEED")
    return path


def _read(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        f.read(length if length is not None else -1)


def test_reading_a_file_makes_exactly_its_bytes_resident_and_evicting_drops_them(data):
    size = data.stat().st_size
    _read(data)
    assert resident_bytes([data]) == size
    assert resident_bytes([data, data.with_name("missing")]) == size
    evict(data)
    assert resident_bytes([data]) == 0


def test_a_range_is_counted_and_evicted_by_its_own_bytes(data):
    _read(data)
    evict(data, 2 * MiB, 2 * MiB)  # 2 MiB aligned: holds whole folios, whatever their size
    assert resident_range(data, 2 * MiB, 2 * MiB) == 0
    assert resident_bytes([data]) == data.stat().st_size - 2 * MiB
    assert resident_range(data, 0, 2 * MiB) == 2 * MiB
    assert resident_range(data, 100, 50) == 50  # part of one resident page
    assert resident_range(data, 2 * MiB - 10, 20) == 10  # half in, half out
    assert resident_range(data, data.stat().st_size - 10, 1000) == 10  # clipped at the end of the file


def test_a_small_unaligned_range_goes_with_the_folio_around_it(data):
    _read(data)
    evict(data, 5 * MiB + 100, 5000, align=FOLIO_MAX)  # a page-sized range may sit inside a large folio
    assert resident_range(data, 5 * MiB + 100, 5000) == 0
    assert resident_range(data, 4 * MiB, 2 * MiB) == 0  # the 2 MiB block around it
    assert resident_bytes([data]) == data.stat().st_size - 2 * MiB


def test_pages_a_live_process_maps_are_not_evicted(data):
    fd = os.open(data, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        mm[:: PAGE]  # touch every page (MAP_POPULATE may be missing)
        evict(data)
        assert resident_bytes([data]) == data.stat().st_size
        mm.close()
        evict(data)
        assert resident_bytes([data]) == 0
    finally:
        os.close(fd)


def test_the_meter_samples_page_cache_residency_and_averages_it_over_time(data):
    clock = [0.0]
    meter = Meter(lambda: {}, page_cache_files=[data], page_cache_interval=0.0, clock=lambda: clock[0])
    meter.sample()  # t = 0: nothing resident
    _read(data)
    evict(data, 0, 4 * MiB)
    size = data.stat().st_size - 4 * MiB  # resident from t = 1 (exact: no readahead past the end of the file)
    clock[0] = 1.0
    meter.sample()
    clock[0] = 3.0
    meter.sample()
    assert [s.page_cache_bytes for s in meter.samples] == [0, size, size]
    assert meter.page_cache_gb_avg() == pytest.approx(size * 2 / 3 / 1e9)


def test_the_meter_reads_the_page_cache_no_more_often_than_asked(data):
    clock = [0.0]
    meter = Meter(lambda: {}, page_cache_files=[data], page_cache_interval=5.0, clock=lambda: clock[0])
    meter.sample()
    _read(data)
    clock[0] = 1.0
    meter.sample()  # not due yet: the last reading carries forward
    clock[0] = 5.0
    meter.sample()
    assert [s.page_cache_bytes for s in meter.samples] == [0, 0, data.stat().st_size]
