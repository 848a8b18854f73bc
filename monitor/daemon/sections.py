"""The daemon config's plain sections: alarm, mqtt (and its tls), evidence, metrics, web."""

from __future__ import annotations

from dataclasses import dataclass

from monitor.daemon.rules import DEFAULT_K, DEFAULT_N


@dataclass(frozen=True)
class AlarmConfig:
    k: int = DEFAULT_K  # kofn: alarm ON after k of the last n windows exceed the threshold (2)
    n: int = DEFAULT_N  # (3)
    hold_s: float = 30.0  # alarm OFF after this long with every window below the threshold
    # None: from the false-alarm budget and the model's calibrated tail (monitor/calibration.py),
    # or the artifact's stored threshold for models trained before calibration. For kofn a
    # score level; for ewma/cusum a level of the statistic (standard deviations of normal scores).
    threshold: float | None = None
    false_alarms_per_day: float = 1.0 / 7.0  # the budget: expected false alarms a day, this source
    # auto | kofn | ewma | cusum (monitor/daemon/rules.py). auto: ewma on a model with a
    # calibrated tail; kofn where the config sets a score `threshold` or its own k / n, or the
    # model has no tail
    rule: str = "auto"
    ewma_lambda: float = 0.2  # ewma: weight of the newest window
    cusum_k: float = 0.5  # cusum: allowance, in standard deviations of normal scores
    # ewma/cusum: a window's standardised score counts at most this much (None: uncapped), so
    # one loud healthy window (a dropped tool) cannot start an alarm, a lasting shift still adds up
    score_cap: float | None = 3.0


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    insecure: bool = False  # skip host name verification (test brokers only)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "harken"
    username: str | None = None
    password_file: str | None = None
    client_id: str | None = None  # default: harken-<node>
    keepalive_s: int = 30
    tls: TlsConfig | None = None
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    discovery: bool = False  # Home Assistant MQTT discovery
    discovery_prefix: str = "homeassistant"
    outbox_max_events: int = 10_000  # durable outbox bound (events and alarm states)
    # accept verdicts on <prefix>/<node>/<source>/verdict/set (monitor/daemon/mqtt_verdicts.py)
    verdicts: bool = False


@dataclass(frozen=True)
class EvidenceConfig:
    enabled: bool = True
    max_count: int = 200  # alarm evidence sets kept (WAV + PNG)
    max_bytes: int = 500_000_000


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"  # localhost by default: metrics are not for the whole network
    port: int = 9464


@dataclass(frozen=True)
class WebConfig:
    """The operator's page (monitor/daemon/web.py); off unless enabled."""

    enabled: bool = False
    host: str = "127.0.0.1"  # localhost by default: reading the page needs no token there
    port: int = 8099
    token_file: str | None = None  # verdicts need it; else $CREDENTIALS_DIRECTORY/web_token


def alarm_problems(a: AlarmConfig, path: str) -> list[str]:
    """Value checks of an `alarm:` section (the daemon's, a source's, or one a window carried)."""
    out = []
    if a.n < 1:
        out.append(f"{path}.n: must be >= 1, got {a.n}")
    if a.k < 1:
        out.append(f"{path}.k: must be >= 1, got {a.k}")
    elif a.k > a.n >= 1:
        out.append(f"{path}.k: must be <= n (got {a.k} > {a.n})")
    if a.hold_s < 0:
        out.append(f"{path}.hold_s: must be >= 0, got {a.hold_s}")
    from monitor.daemon.thresholds import rule_problems

    out += rule_problems(a, path)
    return out
