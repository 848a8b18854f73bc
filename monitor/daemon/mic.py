"""A sound card through sounddevice (PortAudio).

The PortAudio callback only copies the block and `put_nowait`s it on a bounded queue (a full
queue is an overrun: counted, and the next block is marked as a discontinuity). A reader thread
mixes the selected channels down, brings the rate to 16 kHz and hands `AudioBlock`s to the
ring buffer. A stream that dies (device unplugged) is reopened with a back-off.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from monitor.audio import SAMPLE_RATE_HZ, to_mono
from monitor.daemon.config import SourceConfig
from monitor.daemon.types import AudioBlock, BlockSink, WindowSink
from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.resample import StreamResampler

BLOCK_S = 0.1
QUEUE_BLOCKS = 100  # 10 s of audio between the callback and the reader thread


def _sounddevice():
    try:
        import sounddevice
    except OSError as exc:  # the Python package is there but libportaudio2 is not
        raise UsageError(f"mic source: PortAudio is not available ({exc}); install libportaudio2") from None
    return sounddevice


def find_input_device(device: str | int | None, devices: list[dict], *, source: str) -> int | None:
    """Index of the input device named (by index or name substring); None: the default."""
    inputs = [(i, d) for i, d in enumerate(devices) if d.get("max_input_channels", 0) > 0]
    if not inputs:
        named = repr(device) if device is not None else "(default)"
        raise UsageError(f"source {source}: mic device {named} not found: no audio input devices "
                         f"are present (sounddevice lists none)")
    if device is None:
        return None
    names = ", ".join(f"{i}: {d['name']}" for i, d in inputs)
    if isinstance(device, int):
        if any(i == device for i, _ in inputs):
            return device
        raise UsageError(f"source {source}: mic device {device} is not an input device "
                         f"(inputs: {names})")
    matches = [i for i, d in inputs if device.lower() in str(d["name"]).lower()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"source {source}: mic device {device!r} not found (inputs: {names})")
    raise UsageError(f"source {source}: mic device {device!r} is ambiguous (matches "
                     f"{', '.join(str(m) for m in matches)}; inputs: {names})")


# PortAudio lists devices once, when it is initialised: a device plugged in later is seen only
# after re-initialising it, which is safe only while no stream of this process is open.
_PORTAUDIO_LOCK = threading.Lock()
_open_streams = 0


def _count_open(delta: int) -> None:
    global _open_streams
    with _PORTAUDIO_LOCK:
        _open_streams += delta


def _rescan_portaudio() -> None:
    sd = _sounddevice()
    with _PORTAUDIO_LOCK:
        if _open_streams > 0:
            return  # another mic is running: it would be cut off; its list is what we get
        terminate, initialize = getattr(sd, "_terminate", None), getattr(sd, "_initialize", None)
        if terminate is None or initialize is None:
            return
        try:
            terminate()
            initialize()
        except Exception as exc:  # noqa: BLE001 - PortAudioError; the lookup then reports it
            get_logger(stage="source").warning("portaudio_rescan_failed", error=str(exc))


class MicSource:
    def __init__(self, config: SourceConfig, *, query_devices: Callable[[], list] | None = None,
                 stream_factory: Callable[..., object] | None = None,
                 wall: Callable[[], float] = time.time,
                 reopen_backoff_s: tuple[float, float] = (1.0, 30.0)):
        """`query_devices` and `stream_factory` (sounddevice.InputStream's signature) are
        injectable so the logic is testable without a sound card."""
        self.id = config.id
        self.config = config
        self._query_devices = query_devices
        self._stream_factory = stream_factory
        self._wall = wall
        self._backoff = reopen_backoff_s
        self._blocks: queue.Queue = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._stop = threading.Event()
        self._stream = None
        self._thread: threading.Thread | None = None
        self._stream_to_wall_s: float | None = None
        self._pending_gap = False  # set by the callback when it drops a block
        self._gap = True  # the next block starts a new stream
        self.device_index: int | None = None
        self.rate_hz = config.rate_hz or SAMPLE_RATE_HZ
        self._resampler = StreamResampler(self.rate_hz, SAMPLE_RATE_HZ)
        self.overruns = 0
        self.blocks = 0
        self.reopens = 0
        self.reopen_failures = 0
        self.last_audio_mono_s: float | None = None
        self.last_error: str | None = None  # why the device is not open, while stalled
        self.state = "starting"

    # ------------------------------------------------------------------ Source protocol

    def start(self, on_block: BlockSink, on_window: WindowSink) -> None:
        if self._query_devices is None or self._stream_factory is None:
            _sounddevice()  # no PortAudio at all is a broken install: that one fails loudly
        self._on_block = on_block
        try:
            self._find_and_open(rescan=False)
        except UsageError as exc:
            # A USB device often appears seconds after boot, after harken: retry it as a device
            # lost at run time, with back-off, instead of exiting (systemd would not retry).
            self.state = "stalled"
            self.last_error = str(exc)
            get_logger(stage="source", source=self.id).warning(
                "mic_not_available", error=str(exc), retry_in_s=self._backoff[0],
                hint="retrying with back-off until the device appears")
        self._thread = threading.Thread(target=self._read, name=f"harken-mic-{self.id}", daemon=True)
        self._thread.start()

    def _find_and_open(self, *, rescan: bool) -> None:
        """Look the device up (by name: its index may change when it is plugged in again) and
        open it; UsageError naming the device when it is not there or does not open."""
        query = self._query_devices
        if query is None:
            query = _sounddevice().query_devices
            if rescan:
                _rescan_portaudio()
        try:
            devices = list(query())
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - PortAudioError while the host API re-scans
            raise UsageError(f"source {self.id}: cannot list audio devices ({exc})") from None
        self.device_index = find_input_device(self.config.device, devices, source=self.id)
        self._open()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close()
        self.state = "ended"

    @property
    def finished(self) -> bool:
        return False

    def status(self) -> dict:
        return {"state": self.state, "kind": "mic", "device": self.device_index,
                "blocks": self.blocks, "overruns": self.overruns, "reopens": self.reopens,
                "reopen_failures": self.reopen_failures,
                "last_audio_mono_s": self.last_audio_mono_s, "last_error": self.last_error}

    # ------------------------------------------------------------------ PortAudio side

    def _open(self) -> None:
        factory = self._stream_factory
        if factory is None:
            factory = _sounddevice().InputStream
        stream = None
        try:
            stream = factory(device=self.device_index, samplerate=self.rate_hz,
                             channels=self.config.channels, dtype="float32",
                             blocksize=int(self.rate_hz * BLOCK_S), callback=self._callback)
            stream.start()
            self._stream = stream
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - PortAudioError and friends, named for the user
            if stream is not None:
                try:
                    stream.close()
                except Exception as close_exc:  # noqa: BLE001 - it never opened
                    get_logger(stage="source", source=self.id).debug(
                        "mic_close_failed", error=str(close_exc))
            raise UsageError(f"source {self.id}: cannot open mic device "
                             f"{self.config.device if self.config.device is not None else '(default)'}"
                             f" at {self.rate_hz} Hz x {self.config.channels} ch: {exc}") from None
        self._stream_to_wall_s = self._wall() - float(getattr(self._stream, "time", 0.0) or 0.0)
        self._gap = True
        self.state = "running"
        _count_open(+1)

    def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            _count_open(-1)
            try:
                stream.stop()
                stream.close()
            except Exception:  # noqa: BLE001 - closing a dead device may fail; it is gone anyway
                get_logger(stage="source", source=self.id).warning("mic_close_failed")

    def _callback(self, indata, frames, time_info, status) -> None:
        # PortAudio's thread: copy and hand off, nothing else.
        adc = getattr(time_info, "inputBufferAdcTime", 0.0) or 0.0
        overflow = bool(getattr(status, "input_overflow", False))
        # A block dropped here leaves a gap before the NEXT queued block, so the flag travels
        # with that block (the reader may still hold older, contiguous ones).
        item = (indata.copy(), float(adc), overflow, self._pending_gap)
        try:
            self._blocks.put_nowait(item)
            self._pending_gap = False
        except queue.Full:
            self.overruns += 1
            self._pending_gap = True

    # ------------------------------------------------------------------ reader thread

    def _read(self) -> None:
        import structlog

        structlog.contextvars.bind_contextvars(stage="source", source=self.id)
        log = get_logger()
        log.info("source_started", kind="mic", device=self.device_index, rate_hz=self.rate_hz)
        delay = self._backoff[0]
        while not self._stop.is_set():
            try:
                data, adc_s, overflow, gap_before = self._blocks.get(timeout=0.5)
            except queue.Empty:
                # No stream: the last reopen failed (device still gone), so try again.
                if self._stream is None or not getattr(self._stream, "active", True):
                    self._reopen(log, delay)
                    delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            if overflow:
                self.overruns += 1
            if overflow or gap_before:
                self._gap = True
            self._deliver(data, adc_s)

    def _reopen(self, log, delay: float) -> None:
        if self.state != "stalled":  # once per outage, not per retry
            log.warning("mic_stream_dead", retry_in_s=delay)
        self.state = "stalled"
        self._close()
        if self._stop.wait(delay):
            return
        try:
            self._find_and_open(rescan=True)
            self.reopens += 1
            self.last_error = None
            log.info("mic_stream_reopened", device=self.device_index)
        except UsageError as exc:
            self.reopen_failures += 1
            self.last_error = str(exc)
            log.warning("mic_reopen_failed", error=str(exc), retry_in_s=min(
                delay * 2, self._backoff[1]))

    def _deliver(self, data: np.ndarray, adc_s: float) -> None:
        sel = self.config.select_channels
        x = data[:, list(sel)] if sel else data
        frames = x.shape[0]
        if adc_s > 0 and self._stream_to_wall_s is not None:
            start = adc_s + self._stream_to_wall_s
        else:  # some host APIs report no ADC time: estimate from the arrival time
            start = self._wall() - frames / self.rate_hz
        gap, self._gap = self._gap, False
        if gap:
            self._resampler.reset()  # a new stream: nothing is filtered across the gap
        # One stateful resampler for the stream: the 0.1-s blocks come out exactly as the
        # whole recording resampled at once would (no artefact at block edges).
        start -= self._resampler.lag_s
        mono = self._resampler.push(to_mono(x, source=f"mic {self.id}"))
        self.blocks += 1
        self.last_audio_mono_s = time.monotonic()
        self._on_block(AudioBlock(source=self.id, samples=mono, start_time_s=start,
                                  discontinuity=gap, label=None))
