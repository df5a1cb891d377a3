"""Text shown to people: byte sizes in the unit their size calls for."""

import pytest

from unip.text import byte_size


@pytest.mark.parametrize("nbytes, text", [
    (0, "0 B"), (700, "700 B"), (1023, "1,023 B"), (1024, "1 KiB"), (36 * 1024 + 100, "36 KiB"),
    (2**20, "1 MiB"), (512 * 2**20, "512 MiB"), (2**30, "1.0 GiB"), (1.5 * 2**30, "1.5 GiB"),
    (2048 * 2**30, "2,048.0 GiB"),
])
def test_byte_size_picks_the_unit_by_size(nbytes, text):
    assert byte_size(nbytes) == text
