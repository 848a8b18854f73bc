"""`harken synth`: a synthetic slide-rail data set, physically motivated, in DCASE layout.

A slide rail here is a belt-driven linear axis: a servo motor turns a pulley through a gearbox,
the belt pulls a carriage that runs on recirculating balls along a rail between two end stops.
One clip is 10 s at 16 kHz mono and is the sum of these parts (all vectorised numpy):

- **Kinematics.** The carriage makes strokes back and forth: accelerate, cruise, decelerate
  (a trapezoidal speed profile, triangular when the stroke is too short to reach cruise speed),
  then dwell at the end before the return stroke. Speed, acceleration and dwell jitter a little
  from clip to clip and stroke to stroke (payload, controller), and each clip starts at a random
  point of the cycle.
- **Motor.** Electrical harmonics (orders 1-8 of pole pairs x shaft frequency) whose frequency
  follows |v(t)| and whose amplitude follows the motor current: a friction share while moving
  plus the inertial load |a(t)| x payload, so accelerating strokes are louder than cruising.
- **Friction.** Noise shaped by the rail's resonances (3-4 peaks with their own Q, FFT-domain
  shaping) on a broadband floor, scaled by |v|, amplitude-modulated at the ball-pass frequency
  v / ball pitch of the recirculating balls.
- **End stops.** A decaying two-mode resonant burst each time the carriage reaches an end of
  the rail, and a softer one when the motor takes up the load at the start of a stroke.
- **Background.** Pink or brown noise (per machine ID), a distant mains hum with harmonics whose
  level drifts, and occasional clanks from elsewhere in the hall (random resonant bursts). It is
  scaled so that healthy machine power / background power = `snr_db`.

Faults (`FAULTS`), each with a severity in [0, 1] (test anomalies draw it from `SEVERITY_RANGE`,
so some are subtle); severity sets the fault's level and, where it makes sense, how often it
sounds. The fault's own randomness (position, frequencies) does not depend on the severity, so
the same clip can be rendered at several severities:

- `rail_damage`: a dent or spall at a fixed position of the rail (random per clip). Every time
  the carriage passes it, the balls of the carriage's rows click over it one after another
  (spaced by ball pitch / v), louder at higher speed, ringing the rail's resonances.
- `dry_carriage`: a dry, unlubricated carriage. Stick-slip squeal while moving: narrow-band
  tones (1.5-4.5 kHz with a weaker 2nd/3rd partial) whose frequency wanders slowly and whose
  presence comes and goes (more continuous at higher severity), plus rougher, louder friction.
- `slack_belt`: a worn or under-tensioned belt. The carriage's speed ripples at the belt span's
  resonance (more under load, so mostly while accelerating), which frequency-modulates the motor
  harmonics and the friction; the slack span flaps and slaps its guard (low-frequency thumps)
  while the carriage accelerates or brakes, and the backlash knocks at each stroke start.
- `bearing_defect`: an outer-race defect in the motor bearing. Impacts at the bearing's defect
  frequency (a per-ID multiple of the shaft frequency, so proportional to speed) with a little
  slip jitter, amplitude-modulated at the shaft frequency, each ringing a high structural
  resonance (2.5-6 kHz).

Machine parameters (`MachineParams`) are drawn per machine ID from (seed, ID), so IDs differ
(stroke, speeds, motor, rail resonances, background) but are stable across clips. Every clip is
seeded from (seed, ID, split, index): the same arguments give byte-identical files.

One module (about 670 lines) on purpose: every part below is a term of one signal model, read
top to bottom as the list above; split, its parameters would be spread over files.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal
from tqdm import tqdm

from monitor.audio import SAMPLE_RATE_HZ, WINDOW_S
from monitor.errors import UsageError
from monitor.logs import get_logger

FS = SAMPLE_RATE_HZ
CLIP_S = WINDOW_S
FAULTS = ("rail_damage", "dry_carriage", "slack_belt", "bearing_defect")
SEVERITY_RANGE = (0.1, 1.0)
MAX_MACHINE_ID = 99
PEAK_LIMIT = 0.9
TARGET_RMS = 0.05  # about -26 dBFS before the per-clip gain jitter
GAIN_JITTER_DB = 3.0
_SPLIT_CODES = {"train": 0, "test_normal": 1, "test_anomaly": 2}
_TOP_HZ = 0.95 * FS / 2  # no partial above this, so nothing aliases


# --------------------------------------------------------------------------- machine parameters


@dataclass(frozen=True)
class MachineParams:
    """One machine ID's build: what stays the same from clip to clip."""

    machine_id: int
    stroke_m: float
    speed_mps: float  # cruise speed
    accel_mps2: float
    dwell_s: float
    pulley_radius_m: float
    shaft_hz: float  # motor shaft frequency at cruise speed
    pole_pairs: int
    motor_harmonics: tuple[float, ...]  # amplitudes of electrical orders 1..8
    motor_level: float  # motor relative to friction
    rail_res_hz: tuple[float, ...]
    rail_res_q: tuple[float, ...]
    rail_res_gain: tuple[float, ...]
    ball_pitch_m: float
    ball_pass_depth: float
    impact_level: float  # end-stop burst peak relative to the friction RMS at cruise
    impact_res_hz: tuple[float, float]
    impact_decay_s: float
    bearing_order: float  # outer-race defect frequency / shaft frequency
    bearing_res_hz: float
    belt_span_hz: float  # belt span resonance: speed ripple and flapping rate
    background: str  # "pink" or "brown"
    hum_hz: float
    hum_level: float
    clank_rate_hz: float

    @property
    def gear_ratio(self) -> float:
        return self.shaft_hz * 2 * math.pi * self.pulley_radius_m / self.speed_mps

    @property
    def motor_hz(self) -> float:
        """Electrical fundamental at cruise speed."""
        return self.pole_pairs * self.shaft_hz

    @classmethod
    def for_id(cls, machine_id: int, seed: int = 0) -> MachineParams:
        _check_id(machine_id)
        rng = np.random.default_rng(np.random.SeedSequence([seed, machine_id, 7919]))
        n_res = int(rng.integers(3, 5))
        res_hz = np.sort(np.exp(rng.uniform(np.log(500), np.log(6000), n_res)))
        harmonics = rng.uniform(0.1, 1.0, 8) / np.arange(1, 9) ** 0.7
        harmonics[[1, 5]] *= 2.0  # 2nd and 6th orders: cogging and torque ripple of PM motors
        return cls(
            machine_id=machine_id,
            stroke_m=float(rng.uniform(0.25, 0.6)),
            speed_mps=float(rng.uniform(0.4, 1.0)),
            accel_mps2=float(rng.uniform(3.0, 9.0)),
            dwell_s=float(rng.uniform(0.15, 0.5)),
            pulley_radius_m=float(rng.uniform(0.012, 0.025)),
            shaft_hz=float(rng.uniform(25.0, 80.0)),
            pole_pairs=int(rng.integers(2, 5)),
            motor_harmonics=tuple(float(h) for h in harmonics / harmonics.max()),
            motor_level=float(rng.uniform(0.5, 1.2)),
            rail_res_hz=tuple(float(f) for f in res_hz),
            rail_res_q=tuple(float(q) for q in rng.uniform(8.0, 30.0, n_res)),
            rail_res_gain=tuple(float(g) for g in rng.uniform(0.4, 1.0, n_res)),
            ball_pitch_m=float(rng.uniform(0.004, 0.008)),
            ball_pass_depth=float(rng.uniform(0.15, 0.45)),
            impact_level=float(rng.uniform(2.0, 5.0)),
            impact_res_hz=(float(rng.uniform(250, 900)), float(rng.uniform(1200, 3000))),
            impact_decay_s=float(rng.uniform(0.012, 0.04)),
            bearing_order=float(rng.uniform(3.05, 5.4)),
            bearing_res_hz=float(rng.uniform(2500, 6000)),
            belt_span_hz=float(rng.uniform(9.0, 25.0)),
            background=("pink", "brown")[int(rng.integers(0, 2))],
            hum_hz=(50.0, 60.0)[int(rng.integers(0, 2))],
            hum_level=float(rng.uniform(0.1, 0.5)),
            clank_rate_hz=float(rng.uniform(0.1, 0.5)),
        )


@dataclass(frozen=True)
class Kinematics:
    """Per-sample motion of one clip; velocities in m/s along the rail (signed)."""

    v_mps: np.ndarray  # carriage velocity (after any belt ripple)
    motor_v_mps: np.ndarray  # belt speed at the pulley, in carriage units
    accel_mps2: np.ndarray  # commanded acceleration
    x_m: np.ndarray  # carriage position, 0 .. stroke_m
    stroke_starts: np.ndarray  # sample indices where a stroke begins
    stroke_ends: np.ndarray  # sample indices where the carriage reaches the end stop
    speed_mps: float  # this clip's cruise speed


@dataclass(frozen=True)
class ClipComponents:
    """One clip's parts before mixing, for tests that check SNR and fault levels."""

    machine: np.ndarray  # the machine as it runs (with a slack belt's ripple), without fault sounds
    fault: np.ndarray  # sounds the fault adds (zeros for a healthy clip)
    background: np.ndarray  # already scaled to the requested SNR against `machine`
    gain: float  # applied to the sum by mix()

    def mix(self) -> np.ndarray:
        return (self.gain * (self.machine + self.fault + self.background)).astype(np.float32)


# --------------------------------------------------------------------------- building blocks


def _check_id(machine_id) -> None:
    if isinstance(machine_id, bool) or not isinstance(machine_id, (int, np.integer)) \
            or not 0 <= machine_id <= MAX_MACHINE_ID:
        raise UsageError(f"machine ID must be an integer in 0-{MAX_MACHINE_ID}, got {machine_id!r}")


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) or 1e-12


def _freqs(n: int) -> np.ndarray:
    return np.fft.rfftfreq(n, 1 / FS)


def _shaped_noise(n: int, rng: np.random.Generator, magnitude: np.ndarray) -> np.ndarray:
    """Gaussian noise with the given magnitude response (on rfftfreq bins), unit RMS."""
    m = magnitude.astype(np.float32)
    spec = np.empty(m.size, dtype=np.complex64)
    spec.real = rng.standard_normal(m.size, dtype=np.float32) * m
    spec.imag = rng.standard_normal(m.size, dtype=np.float32) * m
    x = np.fft.irfft(spec, n).astype(np.float64)
    return x / _rms(x)


def _resonances(f: np.ndarray, centres, qs, gains) -> np.ndarray:
    """Magnitude of parallel second-order band-pass resonances."""
    f = np.maximum(f, 1.0)
    out = np.zeros_like(f)
    for fc, q, g in zip(centres, qs, gains):
        out += g / np.sqrt(1.0 + q * q * (f / fc - fc / f) ** 2)
    return out


def _rail_magnitude(p: MachineParams, f: np.ndarray) -> np.ndarray:
    floor = 0.12 / np.sqrt(1.0 + (f / 4000.0) ** 2) * np.minimum(1.0, f / 150.0)
    return floor + _resonances(f, p.rail_res_hz, p.rail_res_q, p.rail_res_gain)


def _slow_noise(n: int, rng: np.random.Generator, cutoff_hz: float) -> np.ndarray:
    """Zero-mean, unit-RMS random wander below cutoff_hz."""
    f = _freqs(n)
    return _shaped_noise(n, rng, 1.0 / (1.0 + (f / cutoff_hz) ** 4))


def _onepole(x: np.ndarray, cutoff_hz: float) -> np.ndarray:
    a = math.exp(-2 * math.pi * cutoff_hz / FS)
    return signal.lfilter([1 - a], [1, -a], x)


def _harmonic_sum(phase: np.ndarray, amps, offsets) -> np.ndarray:
    """sum_k amps[k] * sin((k + 1) * phase + offsets[k])."""
    # wrapped once in float64, the float32 phase stays exact to ~1e-5 rad and sin is 5x faster
    wrapped = np.mod(phase, 2 * np.pi).astype(np.float32)
    out = np.zeros(phase.size, dtype=np.float32)
    for order, (amp, off) in enumerate(zip(amps, offsets), start=1):
        if amp:
            out += np.float32(amp) * np.sin(np.float32(order) * wrapped + np.float32(off))
    return out.astype(np.float64)


def _damped_modes(duration_s: float, modes) -> np.ndarray:
    """Sum of decaying sinusoids (freq_hz, decay_s, amplitude), peak-normalised."""
    t = np.arange(int(duration_s * FS)) / FS
    k = sum(a * np.exp(-t / d) * np.sin(2 * np.pi * f * t) for f, d, a in modes)
    return k / np.max(np.abs(k))


def _place(n: int, at: np.ndarray, amps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Add amps[i] * kernel starting at sample at[i]; events are few, samples are not looped."""
    out = np.zeros(n)
    for i, a in zip(at.astype(int), amps):
        if 0 <= i < n:
            m = min(kernel.size, n - i)
            out[i:i + m] += a * kernel[:m]
    return out


def _impulse_train(n: int, at: np.ndarray, amps: np.ndarray) -> np.ndarray:
    train = np.zeros(n)
    at = np.asarray(at, dtype=int)
    keep = (at >= 0) & (at < n)
    np.add.at(train, at[keep], np.asarray(amps)[keep])
    return train


def _ring(train: np.ndarray, centre_hz: float, rel_bw: float) -> np.ndarray:
    """Causal band-pass ringing of an impulse train, scaled so one unit impulse peaks at 1."""
    lo, hi = centre_hz * (1 - rel_bw / 2), min(centre_hz * (1 + rel_bw / 2), _TOP_HZ)
    sos = signal.butter(2, [lo, hi], btype="bandpass", fs=FS, output="sos")
    probe = np.zeros(int(0.05 * FS))
    probe[0] = 1.0
    return signal.sosfilt(sos, train) / np.max(np.abs(signal.sosfilt(sos, probe)))


# --------------------------------------------------------------------------- the machine


def _kinematics(p: MachineParams, n: int, rng: np.random.Generator) -> Kinematics:
    speed = p.speed_mps * (1 + 0.02 * rng.standard_normal())
    accel = p.accel_mps2 * (1 + 0.05 * rng.standard_normal())
    speed = min(speed, math.sqrt(p.stroke_m * accel))  # triangular profile on short strokes
    t_acc = speed / accel
    move_s = 2 * t_acc + (p.stroke_m - speed * t_acc) / speed
    lead_s = rng.uniform(0, 2 * (move_s + p.dwell_s))  # the clip starts anywhere in a cycle
    n_strokes = int((lead_s + n / FS) / (move_s + 0.8 * p.dwell_s)) + 2
    dwell = p.dwell_s * rng.uniform(0.8, 1.2, n_strokes)
    starts = np.concatenate([[0.0], np.cumsum(move_s + dwell)[:-1]])
    first = 1.0 if rng.random() < 0.5 else -1.0
    direction = first * np.where(np.arange(n_strokes) % 2 == 0, 1.0, -1.0)

    t = lead_s + np.arange(n) / FS
    k = np.searchsorted(starts, t, side="right") - 1
    tau = t - starts[k]
    to_go = move_s - tau
    speed_now = np.clip(np.minimum(np.minimum(accel * tau, speed), accel * to_go), 0.0, None)
    acc_mag = np.where(tau < t_acc, accel, np.where((to_go > 0) & (to_go < t_acc), -accel, 0.0))
    # distance covered in the stroke, exact for the trapezoid
    cruise_end = move_s - t_acc
    dist = np.where(tau < t_acc, 0.5 * accel * tau ** 2,
                    np.where(tau < cruise_end, 0.5 * accel * t_acc ** 2 + speed * (tau - t_acc),
                             p.stroke_m - 0.5 * accel * np.clip(to_go, 0, None) ** 2))
    d = direction[k]
    x = np.where(d > 0, dist, p.stroke_m - dist)

    def idx(times):
        s = np.round((times - lead_s) * FS).astype(int)
        return s[(s >= 0) & (s < n)]

    v = d * speed_now
    return Kinematics(v_mps=v, motor_v_mps=v, accel_mps2=d * acc_mag, x_m=x,
                      stroke_starts=idx(starts), stroke_ends=idx(starts + move_s), speed_mps=speed)


def _motor(p: MachineParams, kin: Kinematics, rng: np.random.Generator) -> np.ndarray:
    rel_speed = np.abs(kin.motor_v_mps) / p.speed_mps
    f_e = p.motor_hz * rel_speed
    phase = 2 * np.pi * np.cumsum(f_e) / FS + rng.uniform(0, 2 * np.pi)
    payload = rng.uniform(0.8, 1.2)
    moving = np.minimum(1.0, rel_speed / 0.05)
    current = moving * (0.35 + payload * np.abs(kin.accel_mps2) / p.accel_mps2)
    env = _onepole(current, 40.0)
    top = p.motor_hz * max(1.0, rel_speed.max())
    offsets = rng.uniform(0, 2 * np.pi, len(p.motor_harmonics))
    amps = [a if order * top < _TOP_HZ else 0.0
            for order, a in enumerate(p.motor_harmonics, start=1)]
    return env * _harmonic_sum(phase, amps, offsets)


def _friction(p: MachineParams, kin: Kinematics, rng: np.random.Generator) -> np.ndarray:
    """Unit friction noise at cruise speed, shaped by the rail and scaled by |v|."""
    n = kin.v_mps.size
    noise = _shaped_noise(n, rng, _rail_magnitude(p, _freqs(n)))
    speed = np.abs(kin.v_mps)
    ball_phase = 2 * np.pi * np.cumsum(speed / p.ball_pitch_m) / FS
    lube = rng.uniform(0.9, 1.1)
    ball_pass = 1 + p.ball_pass_depth * np.sin(ball_phase)
    return noise * lube * (speed / p.speed_mps) ** 1.2 * ball_pass


def _end_stops(p: MachineParams, kin: Kinematics, rng: np.random.Generator) -> np.ndarray:
    n = kin.v_mps.size
    f1, f2 = p.impact_res_hz
    kernel = _damped_modes(6 * p.impact_decay_s, [(f1, p.impact_decay_s, 1.0),
                                                  (f2, 0.4 * p.impact_decay_s, 0.6)])
    ends = _place(n, kin.stroke_ends, p.impact_level * rng.uniform(0.7, 1.3, kin.stroke_ends.size),
                  kernel)
    starts = _place(n, kin.stroke_starts,
                    0.25 * p.impact_level * rng.uniform(0.7, 1.3, kin.stroke_starts.size), kernel)
    return ends + starts


def _background(p: MachineParams, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unscaled hall background: coloured noise, distant hum, clanks."""
    f = _freqs(n)
    tilt = np.maximum(f, 20.0) ** (-0.5 if p.background == "pink" else -1.0)
    tilt[f < 10] = 0.0
    noise = _shaped_noise(n, rng, tilt)
    drift = 1 + 0.2 * _slow_noise(n, rng, 0.3)
    # 50 and 60 Hz both fit a whole number of cycles in one second: render 1 s and repeat it
    one_s = _harmonic_sum(2 * np.pi * p.hum_hz * np.arange(FS) / FS,
                          rng.uniform(0.2, 1.0, 5) / np.arange(1, 6), rng.uniform(0, 2 * np.pi, 5))
    hum = np.tile(one_s, n // FS + 1)[:n]
    hum = p.hum_level * rng.uniform(0.6, 1.4) * drift * hum / _rms(hum)
    n_clanks = rng.poisson(p.clank_rate_hz * n / FS)
    clanks = np.zeros(n)
    for at in rng.integers(0, n, n_clanks):
        f0 = rng.uniform(150, 2500)
        kernel = _damped_modes(0.4, [(f0, rng.uniform(0.04, 0.15), 1.0),
                                     (f0 * rng.uniform(1.5, 2.8), 0.03, 0.5)])
        clanks += _place(n, np.array([at]), np.array([rng.uniform(1.0, 4.0)]), kernel)
    return noise + hum + clanks


# --------------------------------------------------------------------------- faults


def _level(severity: float, lo_db: float, hi_db: float) -> float:
    return 10 ** ((lo_db + severity * (hi_db - lo_db)) / 20)


def _fault_rail_damage(p: MachineParams, kin: Kinematics, severity: float,
                       rng: np.random.Generator, ref_rms: float,
                       friction: np.ndarray) -> np.ndarray:
    n = kin.v_mps.size
    x_dent = rng.uniform(0.15, 0.85) * p.stroke_m
    side = np.sign(kin.x_m - x_dent)
    cross = np.nonzero(side[1:] * side[:-1] < 0)[0] + 1
    rows = 4  # balls of the carriage's ball rows rolling over the dent one after another
    speed = np.maximum(np.abs(kin.v_mps[cross]), 0.05 * p.speed_mps)
    gaps = p.ball_pitch_m / speed * FS
    at = (cross[:, None] + np.arange(rows)[None, :] * gaps[:, None]).ravel()
    amps = ((speed / p.speed_mps)[:, None] * rng.uniform(0.6, 1.0, (cross.size, rows))).ravel()
    train = _impulse_train(n, np.round(at), amps)
    # each click rings the rail's resonances and a sharp high band
    click = sum(g * _ring(train, fc, 2.0 / q) for fc, q, g in
                zip(p.rail_res_hz, p.rail_res_q, p.rail_res_gain)) + _ring(train, 5000.0, 0.8)
    return ref_rms * _level(severity, 6.0, 24.0) * click / max(1e-9, np.max(np.abs(click)))


def _fault_dry_carriage(p: MachineParams, kin: Kinematics, severity: float,
                        rng: np.random.Generator, ref_rms: float,
                        friction: np.ndarray) -> np.ndarray:
    n = kin.v_mps.size
    rel = np.abs(kin.v_mps) / p.speed_mps
    f0 = rng.uniform(1500, 4500)
    wander = _slow_noise(n, rng, 0.5)
    freq = f0 * (1 + 0.015 * wander + 0.02 * rel)
    phase = 2 * np.pi * np.cumsum(freq) / FS
    tone = np.sin(phase)
    for partial, amp in ((2, 0.35), (3, 0.15)):
        if partial * f0 * 1.06 < _TOP_HZ:
            tone += amp * np.sin(partial * phase + rng.uniform(0, 6.3))
    moving = np.clip((rel - 0.2) / 0.3, 0.0, 1.0)
    # stick-slip comes and goes; a worse carriage squeals more of the time
    presence = 1 / (1 + np.exp(-(_slow_noise(n, rng, 1.0) - (0.9 - 1.6 * severity)) / 0.25))
    tremolo = 1 + 0.4 * np.sin(2 * np.pi * rng.uniform(6, 15) * np.arange(n) / FS)
    squeal = moving * presence * tremolo * tone
    squeal = _rms(friction) * _level(severity, -22.0, -4.0) * squeal / _rms(tone)
    return squeal + _level(severity, -18.0, -6.0) * friction  # rougher, louder friction


def _fault_slack_belt(p: MachineParams, kin: Kinematics, severity: float,
                      rng: np.random.Generator, ref_rms: float,
                      friction: np.ndarray) -> np.ndarray:
    n = kin.v_mps.size
    load = np.abs(kin.accel_mps2) / p.accel_mps2
    flap_hz = p.belt_span_hz * rng.uniform(0.9, 1.1)
    flap_phase = np.cumsum(flap_hz * (load > 0)) / FS + rng.random()
    slap_at = np.nonzero(np.diff(np.floor(flap_phase)) > 0)[0] + 1
    slap_amps = rng.uniform(0.3, 1.0, slap_at.size) * (rng.random(slap_at.size) < 0.8)
    slap = _damped_modes(0.12, [(rng.uniform(90, 250), 0.03, 1.0),
                                (rng.uniform(400, 1200), 0.01, 0.6)])
    knock = _damped_modes(0.06, [(rng.uniform(600, 1500), 0.008, 1.0)])
    out = _place(n, slap_at, slap_amps, slap) + _place(n, kin.stroke_starts,
                                                       np.ones(kin.stroke_starts.size), knock)
    return ref_rms * _level(severity, 6.0, 20.0) * out


def _slack_ripple(p: MachineParams, kin: Kinematics, severity: float,
                  rng: np.random.Generator) -> Kinematics:
    """A slack belt lets the carriage oscillate against the motor at the span's resonance."""
    n = kin.v_mps.size
    load = _onepole(np.abs(kin.accel_mps2) / p.accel_mps2, 20.0)
    ripple = np.sin(2 * np.pi * p.belt_span_hz * rng.uniform(0.9, 1.1) * np.arange(n) / FS
                    + rng.uniform(0, 6.3))
    depth = (0.02 + 0.12 * severity) * (0.3 + load)
    return Kinematics(v_mps=kin.v_mps * (1 + depth * ripple),
                      motor_v_mps=kin.motor_v_mps * (1 - 0.4 * depth * ripple),
                      accel_mps2=kin.accel_mps2, x_m=kin.x_m, stroke_starts=kin.stroke_starts,
                      stroke_ends=kin.stroke_ends, speed_mps=kin.speed_mps)


def _fault_bearing_defect(p: MachineParams, kin: Kinematics, severity: float,
                          rng: np.random.Generator, ref_rms: float,
                          friction: np.ndarray) -> np.ndarray:
    n = kin.v_mps.size
    shaft = p.shaft_hz * np.abs(kin.motor_v_mps) / p.speed_mps
    defect_phase = np.cumsum(p.bearing_order * shaft) / FS + rng.random()
    at = np.nonzero(np.diff(np.floor(defect_phase)) > 0)[0] + 1
    at = at + np.round(rng.normal(0, 0.0004 * FS, at.size))  # rolling elements slip a little
    shaft_phase = 2 * np.pi * np.cumsum(shaft) / FS
    amps = (shaft[at.clip(0, n - 1).astype(int)] / p.shaft_hz) \
        * (1 + 0.6 * np.cos(shaft_phase[at.clip(0, n - 1).astype(int)])) \
        * rng.uniform(0.7, 1.0, at.size)
    ring = _ring(_impulse_train(n, at, amps), p.bearing_res_hz * rng.uniform(0.95, 1.05), 0.25)
    return ref_rms * _level(severity, -6.0, 14.0) * ring / max(1e-9, np.max(np.abs(ring)))


_FAULT_SOUNDS = {
    "rail_damage": _fault_rail_damage,
    "dry_carriage": _fault_dry_carriage,
    "slack_belt": _fault_slack_belt,
    "bearing_defect": _fault_bearing_defect,
}


# --------------------------------------------------------------------------- one clip


def _seed_sequence(rng) -> np.random.SeedSequence:
    if isinstance(rng, np.random.SeedSequence):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.SeedSequence(int(rng))
    if isinstance(rng, np.random.Generator):
        return np.random.SeedSequence(rng.integers(0, 2 ** 63, 4).tolist())
    if rng is None:
        return np.random.SeedSequence()
    raise TypeError(f"rng must be a numpy Generator, SeedSequence, int or None, got {type(rng)}")


def render_components(machine: int | MachineParams, fault: str | None = None,
                      severity: float = 0.0, *, rng=None, snr_db: float = 0.0,
                      seconds: float = CLIP_S, seed: int = 0) -> ClipComponents:
    """Render one clip's parts. `machine` is an ID (parameters from (seed, ID)) or MachineParams.

    rng: a numpy Generator, SeedSequence or int; the same value gives the same clip, and the
    healthy parts do not depend on `fault` or `severity`.
    """
    p = machine if isinstance(machine, MachineParams) else MachineParams.for_id(machine, seed)
    if fault is not None and fault not in _FAULT_SOUNDS:
        raise UsageError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
    if not 0.0 <= severity <= 1.0:
        raise UsageError(f"severity must be in [0, 1], got {severity}")
    if not math.isfinite(snr_db):
        raise UsageError(f"snr_db must be a finite number, got {snr_db}")
    n = int(round(seconds * FS))
    if n < FS // 10:
        raise UsageError(f"seconds must be >= 0.1, got {seconds}")
    kin_rng, motor_rng, fric_rng, stop_rng, bg_rng, gain_rng, fault_rng = (
        np.random.default_rng(s) for s in _seed_sequence(rng).spawn(7))

    kin = _kinematics(p, n, kin_rng)
    if fault == "slack_belt":
        kin = _slack_ripple(p, kin, severity, np.random.default_rng(fault_rng.integers(2 ** 63)))
    friction = _friction(p, kin, fric_rng)
    body = p.motor_level * _motor(p, kin, motor_rng) + friction
    machine_sound = body + _end_stops(p, kin, stop_rng)
    fault_sound = (np.zeros(n) if fault is None else
                   _FAULT_SOUNDS[fault](p, kin, severity, fault_rng, _rms(body), friction))

    background = _background(p, n, bg_rng)
    background *= math.sqrt(np.mean(machine_sound ** 2) / np.mean(background ** 2)
                            / 10 ** (snr_db / 10))
    healthy = machine_sound + background
    jitter_db = gain_rng.uniform(-GAIN_JITTER_DB, GAIN_JITTER_DB)
    gain = TARGET_RMS * 10 ** (jitter_db / 20) / _rms(healthy)
    peak = np.max(np.abs(healthy + fault_sound)) * gain
    if peak > PEAK_LIMIT:
        gain *= PEAK_LIMIT / peak
    return ClipComponents(machine=machine_sound, fault=fault_sound, background=background,
                          gain=float(gain))


def render_clip(machine: int | MachineParams, fault: str | None = None, severity: float = 0.0,
                *, rng=None, snr_db: float = 0.0, seconds: float = CLIP_S,
                seed: int = 0) -> np.ndarray:
    """One clip as float32 at 16 kHz, peak <= PEAK_LIMIT; see render_components."""
    return render_components(machine, fault, severity, rng=rng, snr_db=snr_db, seconds=seconds,
                             seed=seed).mix()


def clip_seed(seed: int, machine_id: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of one data-set clip; split is train, test_normal or test_anomaly."""
    return np.random.SeedSequence([seed, machine_id, _SPLIT_CODES[split], index])


# --------------------------------------------------------------------------- the data set


@dataclass(frozen=True)
class _PlannedClip:
    rel_path: str
    split: str  # train / test_normal / test_anomaly
    machine_id: int
    index: int
    fault: str | None


def _write_wav(path: Path, audio: np.ndarray) -> None:
    """Encoded in memory, then written by Python: a full disk is an OSError with its errno
    (libsndfile reports it only as "System error")."""
    buf = io.BytesIO()
    sf.write(buf, audio, FS, format="WAV", subtype="PCM_16")
    path.write_bytes(buf.getvalue())


def _check_args(ids, counts: dict, snr_db, seed) -> tuple[int, ...]:
    ids = tuple(ids) if ids is not None else ()
    if not ids:
        raise UsageError("at least one machine ID is needed")
    for mid in ids:
        _check_id(mid)
    if len(set(ids)) != len(ids):
        raise UsageError(f"machine IDs must be distinct, got {','.join(map(str, ids))}")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise UsageError(f"{name} must be a non-negative integer, got {value!r}")
    if sum(counts.values()) == 0:
        raise UsageError("nothing to write: all clip counts are 0")
    if not isinstance(snr_db, (int, float)) or not -40.0 <= snr_db <= 60.0:
        raise UsageError(f"snr_db must be between -40 and 60 dB, got {snr_db!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    return tuple(int(m) for m in ids)


def _plan(ids, n_train, n_test_normal, n_test_anomaly) -> list[_PlannedClip]:
    plan = []
    for mid in ids:
        for split, folder, label, count in (("train", "train", "normal", n_train),
                                            ("test_normal", "test", "normal", n_test_normal),
                                            ("test_anomaly", "test", "anomaly", n_test_anomaly)):
            for i in range(count):
                # faults take turns (rotated per ID) so every ID gets every fault
                fault = FAULTS[(i + mid) % len(FAULTS)] if label == "anomaly" else None
                plan.append(_PlannedClip(f"{folder}/{label}_id_{mid:02d}_{i:08d}.wav", split,
                                         mid, i, fault))
    return plan


def write_dataset(out, *, ids=(0, 1, 2), n_train: int = 100, n_test_normal: int = 30,
                  n_test_anomaly: int = 30, snr_db: float = 0.0, seed: int = 0,
                  progress: bool = True) -> dict:
    """Write OUT/train/normal_id_XX_NNNNNNNN.wav, OUT/test/{normal,anomaly}_..., OUT/labels.csv.

    OUT must not exist or be empty. The files appear under OUT only once all are written.
    Returns a summary: total_files, counts per split, faults (count per fault), seconds.
    """
    started = time.monotonic()
    out = Path(out)
    counts = {"n_train": n_train, "n_test_normal": n_test_normal, "n_test_anomaly": n_test_anomaly}
    ids = _check_args(ids, counts, snr_db, seed)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: already exists and is not an empty directory; "
                         "choose a new output folder")
    plan = _plan(ids, n_train, n_test_normal, n_test_anomaly)
    params = {mid: MachineParams.for_id(mid, seed) for mid in ids}
    log = get_logger(stage="synth")

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    rows = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "train").mkdir(parents=True)
        (staging / "test").mkdir()
        for clip in tqdm(plan, unit="clip", desc="synth", disable=not progress, leave=False):
            rng = np.random.default_rng(clip_seed(seed, clip.machine_id, clip.split, clip.index))
            severity = float(rng.uniform(*SEVERITY_RANGE)) if clip.fault else 0.0
            audio = render_clip(params[clip.machine_id], clip.fault, severity, rng=rng,
                                snr_db=float(snr_db))
            _write_wav(staging / clip.rel_path, audio)
            rows.append((clip.rel_path, clip.rel_path.split("/")[0],
                         "anomaly" if clip.fault else "normal", clip.machine_id,
                         clip.fault or "none", f"{severity:.3f}"))
        with open(staging / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("file", "split", "label", "machine_id", "fault", "severity"))
            writer.writerows(rows)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(staging, out)
    except OSError as exc:  # a full disk, a read-only mount, no permission
        shutil.rmtree(staging, ignore_errors=True)
        raise UsageError(f"{out}: cannot write the data set ({exc.strerror or exc}); nothing "
                         "was written") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    faults = {name: sum(1 for c in plan if c.fault == name) for name in FAULTS}
    summary = {
        "out": str(out),
        "total_files": len(plan),
        "counts": {split: sum(1 for c in plan if c.split == split) for split in _SPLIT_CODES},
        "faults": faults,
        "ids": list(ids),
        "snr_db": float(snr_db),
        "seed": int(seed),
        "seconds": round(time.monotonic() - started, 2),
    }
    log.info("synth_written", **{k: v for k, v in summary.items() if k != "faults"})
    return summary
