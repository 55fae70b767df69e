"""Every sample in formats/ decodes to its expected output or fails with its named error."""

import re

import pytest

import lmzip

from conftest import FORMATS, TINY_MODEL


def manifest():
    rows = re.findall(r"^\| (\S+\.lmz) \| (\w+) \|", (FORMATS / "README.md").read_text(), re.M)
    assert len(rows) > 20, "formats/README.md lost its table"
    return rows


def test_every_sample_is_listed():
    listed = {name for name, _ in manifest()}
    assert listed == {p.name for p in FORMATS.glob("*.lmz")}


@pytest.mark.parametrize("name,expect", manifest())
def test_sample(codec, name, expect):
    blob = (FORMATS / name).read_bytes()
    if expect == "ok":
        assert codec.decode(blob, model=TINY_MODEL) == (FORMATS / (name[:-4] + ".out")).read_bytes()
    else:
        with pytest.raises(getattr(lmzip, expect)):
            codec.decode(blob, model=TINY_MODEL)
