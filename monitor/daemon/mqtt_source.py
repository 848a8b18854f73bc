"""MqttAudioSource: audio in from one MQTT topic (raw PCM chunks or whole WAV clips)."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from monitor.audio import iter_windows, to_mono, to_mono_16k
from monitor.daemon import pcm
from monitor.daemon.config import MqttConfig, MqttSourceConfig
from monitor.daemon.mqtt_publisher import RateLimitedWarning, check_topic_part, make_client
from monitor.daemon.types import AudioBlock, BlockSink, Window, WindowSink
from monitor.errors import AudioError, UsageError
from monitor.logs import get_logger
from monitor.resample import StreamResampler

# A seq this far below the last one is not a late chunk but a new count: the sender restarted
# (or the last seq was bogus). Late chunks arrive within a few messages of their place.
SEQ_REORDER_WINDOW = 64
QUEUE_MAX_BYTES = 64 << 20  # payloads waiting for the decoding worker, whatever their count


class MqttAudioSource:
    """Audio from one MQTT topic: raw PCM chunks (`mode: stream`) or whole WAV clips
    (`mode: window`). The subscription is fixed at start; payloads are untrusted."""

    def __init__(self, config: MqttSourceConfig, mqtt: MqttConfig, *, node: str,
                 password: str | None, stall_after_s: float = 10.0, queue_max: int = 256,
                 queue_max_bytes: int = QUEUE_MAX_BYTES):
        self.id = check_topic_part(config.id, "source id")
        # the config's own field limits and rules, for configs built without the loader
        problems = config.problems(f"sources[{config.id}]")
        if problems:
            raise UsageError("; ".join(problems))
        self.topic = config.topic
        self.rate_hz = config.rate_hz or 16_000
        self.config = config
        self.stall_after_s = stall_after_s
        self._log = get_logger(stage="mqtt_source", source=self.id)
        self._warn = RateLimitedWarning(self._log)
        base_id = mqtt.client_id or f"harken-{check_topic_part(node, 'node')}"
        self._client = make_client(mqtt, client_id=f"{base_id}-audio-{self.id}", password=password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._mqtt = mqtt
        self._inbox: queue.Queue = queue.Queue(maxsize=queue_max)
        # Bytes in the inbox = bytes put (paho thread) - bytes taken (worker): one writer each.
        self._queue_max_bytes = queue_max_bytes
        self._bytes_put = 0
        self._bytes_taken = 0
        self._resampler = StreamResampler(self.rate_hz, 16_000)  # stream mode: one per source
        self._shutdown = threading.Event()
        self._connected = threading.Event()
        self._worker: threading.Thread | None = None
        self._on_block: BlockSink | None = None
        self._on_window: WindowSink | None = None
        self._last_seq: int | None = None
        self._pending_break = False  # paho thread: lost before the next queued message
        self._broken = False  # something was lost since the last block: the next one is discontinuous
        self._started_mono: float | None = None
        self._last_audio_mono: float | None = None
        self._counts = {"messages": 0, "bytes": 0, "blocks": 0, "windows": 0, "gaps": 0,
                        "late": 0, "dropped": 0, "restarts": 0}
        self._rejected: dict[str, int] = {}

    # ---------------------------------------------------------------- Source protocol

    def start(self, on_block: BlockSink, on_window: WindowSink) -> None:
        self._on_block, self._on_window = on_block, on_window
        self._started_mono = time.monotonic()
        self._worker = threading.Thread(target=self._run, name=f"mqtt-source-{self.id}",
                                        daemon=True)
        self._worker.start()
        self._log.info("mqtt_source_starting", topic=self.topic, mode=self.config.mode,
                       host=self._mqtt.host, port=self._mqtt.port)
        self._client.connect_async(self._mqtt.host, self._mqtt.port,
                                   keepalive=self._mqtt.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        self._shutdown.set()
        self._client.disable_logger()  # see MqttPublisher.stop: paho's shutdown race is noise
        self._client.disconnect()
        self._client.loop_stop()
        if self._worker is not None:
            self._worker.join(timeout=5.0)

    @property
    def finished(self) -> bool:
        return False  # a live feed never ends by itself

    def status(self) -> dict:
        now = time.monotonic()
        ref = self._last_audio_mono or self._started_mono
        age = None if self._last_audio_mono is None else round(now - self._last_audio_mono, 3)
        stalled = ref is not None and now - ref > self.stall_after_s
        return {"state": "stalled" if stalled else "running", "connected": self._connected.is_set(),
                "last_audio_age_s": age, "last_audio_mono_s": self._last_audio_mono,
                **self._counts, "rejected": dict(self._rejected)}

    # ---------------------------------------------------------------- paho callbacks

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._log.warning("mqtt_connect_refused", reason=str(reason_code))
            return
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            self._log.warning("mqtt_subscribe_refused", topic=self.topic, reason=failed[0])
            return
        self._connected.set()
        self._log.info("mqtt_source_subscribed", topic=self.topic)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and not self._shutdown.is_set():
            self._log.warning("mqtt_source_disconnected", reason=str(reason_code))
        self._connected.clear()
        self._pending_break = True  # chunks sent while we were away are lost

    def _on_message(self, client, userdata, message) -> None:
        if message.topic != self.topic:
            return  # only the fixed subscription is served
        props = getattr(message.properties, "UserProperty", None) if message.properties else None
        # A message dropped here (or a disconnect) breaks the stream before the NEXT queued
        # message, so the flag travels with it; the worker may still hold older, contiguous ones.
        payload = bytes(message.payload)
        item = (payload, list(props or ()), time.time(), self._pending_break)
        try:
            if self._bytes_put - self._bytes_taken + len(payload) > self._queue_max_bytes:
                raise queue.Full  # a flood of large payloads: bounded in bytes too
            self._inbox.put_nowait(item)
            self._bytes_put += len(payload)
            self._pending_break = False
        except queue.Full:
            self._counts["dropped"] += 1
            self._pending_break = True
            self._warn("mqtt_audio_dropped", "queue_full", dropped=self._counts["dropped"])

    # ---------------------------------------------------------------- decoding worker

    def _run(self) -> None:
        while not self._shutdown.is_set():
            try:
                payload, props, arrival_s, broken_before = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._bytes_taken += len(payload)
            if broken_before:
                self._broken = True
            self._counts["messages"] += 1
            self._counts["bytes"] += len(payload)
            try:
                if self.config.mode == "stream":
                    self._handle_chunk(payload, props, arrival_s)
                else:
                    self._handle_clip(payload, props, arrival_s)
            except pcm.PayloadError as exc:
                self._reject(exc.reason, str(exc))
            except AudioError as exc:
                self._reject("bad_audio", str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must not silently end the feed
                self._broken = True
                self._log.exception("mqtt_audio_failed", error=str(exc))

    def _reject(self, reason: str, detail: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        self._broken = True
        self._warn("mqtt_audio_rejected", reason, reason=reason, detail=detail,
                   rejected=self._rejected[reason])

    def _handle_chunk(self, payload: bytes, props: list, arrival_s: float) -> None:
        seq, ts = pcm.parse_user_properties(props)
        discontinuity = self._broken
        if seq is not None:
            last = self._last_seq
            if last is not None and seq < last - SEQ_REORDER_WINDOW or (seq == 0 and last not in (None, 0)):
                # Far behind (or back to 0): a new count, not a late chunk. Dropping every
                # chunk as "late" until the count caught up would silence the source.
                self._counts["restarts"] += 1
                discontinuity = True
            elif last is not None and seq <= last:
                self._counts["late"] += 1
                return
            elif last is not None and seq > last + 1:
                self._counts["gaps"] += 1
                discontinuity = True
        frames = pcm.decode_pcm(payload, format=self.config.format, channels=self.config.channels,
                                select_channels=self.config.select_channels,
                                max_payload_bytes=self.config.max_payload_bytes)
        x = to_mono(frames, source=self.id)
        if seq is not None:
            self._last_seq = seq
        start_s = ts if ts is not None else arrival_s - frames.shape[0] / self.rate_hz
        if discontinuity:
            self._resampler.reset()  # nothing is filtered across a gap
        # The resampler holds back a few input samples: its output starts that much earlier
        # (never before the epoch: a sender whose clock starts at ts 0 gets 0).
        start_s = max(0.0, start_s - self._resampler.lag_s)
        mono = self._resampler.push(x)
        self._broken = False
        self._last_audio_mono = time.monotonic()
        self._counts["blocks"] += 1
        self._on_block(AudioBlock(source=self.id, samples=mono, start_time_s=start_s,
                                  discontinuity=discontinuity))

    def _handle_clip(self, payload: bytes, props: list, arrival_s: float) -> None:
        _, ts = pcm.parse_user_properties(props)
        samples, rate_hz = pcm.decode_wav(payload, max_payload_bytes=self.config.max_payload_bytes)
        mono = to_mono_16k(samples, rate_hz, source=self.id)
        # Only the first window is used: never cut the clip into all of its windows.
        _, window = next(iter_windows(mono, self.config.window_s, self.config.hop_s))
        start_s = ts if ts is not None else arrival_s - samples.shape[0] / rate_hz
        self._last_audio_mono = time.monotonic()
        self._counts["windows"] += 1
        self._on_window(Window(source=self.id, samples=np.ascontiguousarray(window),
                               start_time_s=start_s, duration_s=self.config.window_s,
                               ready_mono_s=time.monotonic(), label=None,
                               machine_id=self.config.machine_id))


def user_properties(seq: int | None = None, ts: float | None = None) -> Properties:
    """PUBLISH properties carrying `seq` and `ts`, for senders of audio (and tests)."""
    props = Properties(PacketTypes.PUBLISH)
    pairs = []
    if seq is not None:
        pairs.append(("seq", str(seq)))
    if ts is not None:
        pairs.append(("ts", repr(float(ts))))
    if pairs:
        props.UserProperty = pairs
    return props
