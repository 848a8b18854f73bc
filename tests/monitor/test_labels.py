from pathlib import Path

import pytest

from monitor.errors import UsageError
from monitor.labels import find_audio, parse_clip


@pytest.mark.parametrize("path,label,mid", [
    ("data/train/normal_id_00_00000000.wav", "normal", 0),
    ("data/test/anomaly_id_04_00000123.wav", "anomaly", 4),
    ("x/slider__anomaly_id_06_00000071.wav", "anomaly", 6),
    ("x/ToyCar__normal_id_02_00000024.wav", "normal", 2),
    ("mimii/slider/id_02/normal/00000010.wav", "normal", 2),
    ("mimii/slider/id_04/abnormal/00000010.wav", "anomaly", 4),
    ("recordings/id_03/whatever.wav", None, 3),
    ("recordings/morning.wav", None, None),
    ("recordings/abnormality_report.wav", None, None),
])
def test_parse_clip(path, label, mid):
    info = parse_clip(path)
    assert (info.label, info.machine_id) == (label, mid)
    assert info.path == Path(path)


def test_find_audio_is_recursive_sorted_and_errors_clearly(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.wav").write_bytes(b"")
    (tmp_path / "a.WAV").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in find_audio(tmp_path)] == ["a.WAV", "z.wav"]
    with pytest.raises(UsageError, match="no such directory"):
        find_audio(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no .wav"):
        find_audio(empty)
