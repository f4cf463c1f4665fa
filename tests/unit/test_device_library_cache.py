"""What a device says about the directory it keeps libraries in (``tvmrp.device_info``'s ``library_cache``),
on the device's side and as the client reads it. (Devices from a bundle keeping libraries: integration
test_kept_libraries.py.)"""

from __future__ import annotations

import os

import pytest

from pipeline.device.device_side import tvmrp_device
from pipeline.device.probe import parse_device_info


@pytest.mark.parametrize("answer, expected", [
    ('{"library_cache": "/srv/tvmrp/libraries"}', "/srv/tvmrp/libraries"),
    ('{"library_cache": "relative/dir"}', None),
    ('{"library_cache": "/a/../etc"}', None),
    ('{"library_cache": "/a\\nb"}', None),
    ('{"library_cache": 7}', None),
    ('{"library_cache": "/' + "x" * 2000 + '"}', None),
])
def test_parse_device_info__takes_only_an_absolute_plain_library_directory(answer, expected):
    assert parse_device_info(answer)["library_cache"] == expected


def test_library_cache__reports_a_private_directory_of_this_user_only(tmp_path, monkeypatch):
    kept = tmp_path / "libraries"
    kept.mkdir(mode=0o700)
    monkeypatch.setenv(tvmrp_device.LIBRARY_CACHE_ENV, str(kept))
    assert tvmrp_device.describe()["library_cache"] == str(kept)
    os.chmod(kept, 0o777)  # others could replace what it keeps: not reported
    assert tvmrp_device.describe()["library_cache"] is None
    link = tmp_path / "link"
    link.symlink_to(kept)
    os.chmod(kept, 0o700)
    monkeypatch.setenv(tvmrp_device.LIBRARY_CACHE_ENV, str(link))
    assert tvmrp_device.describe()["library_cache"] is None
    monkeypatch.setenv(tvmrp_device.LIBRARY_CACHE_ENV, "relative")
    assert tvmrp_device.describe()["library_cache"] is None
    monkeypatch.delenv(tvmrp_device.LIBRARY_CACHE_ENV)
    assert tvmrp_device.describe()["library_cache"] is None
