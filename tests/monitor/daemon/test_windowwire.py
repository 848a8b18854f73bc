import numpy as np
import pytest

from monitor.daemon import windowwire as ww


def _window(seq=3, model="fan-stats", n=16000):
    rng = np.random.default_rng(seq)
    return ww.WireWindow(source="fan1", model=model, seq=seq, start_time_s=1.7e9 + 0.125,
                         samples=(0.1 * rng.standard_normal(n)).astype(np.float32), machine_id=7)


def test_round_trip_is_exact():
    w = _window()
    payload, props = ww.encode(w)
    back = ww.decode(payload, props)
    assert (back.source, back.model, back.seq, back.start_time_s, back.machine_id) == \
        (w.source, w.model, w.seq, w.start_time_s, w.machine_id)
    np.testing.assert_array_equal(back.samples, w.samples)
    assert back.key == ("fan1", 3)


@pytest.mark.parametrize("model", ["../etc", "a/b", "", ".hidden", "x..y"])
def test_model_names_that_escape_the_models_dir_are_refused(model):
    payload, props = ww.encode(_window())
    props = [(k, model if k == "model" else v) for k, v in props]
    with pytest.raises(ww.WireError, match="bad model name"):
        ww.decode(payload, props)


def test_bad_messages_give_one_line():
    payload, props = ww.encode(_window())
    cases = [(b"not a wav", props), (payload, [p for p in props if p[0] != "seq"]),
             (payload, [(k, "x" if k == "seq" else v) for k, v in props])]
    for data, pr in cases:
        with pytest.raises(ww.WireError) as info:
            ww.decode(data, pr)
        assert "\n" not in str(info.value)
