"""The distributed roles of `harken monitor` (issue 17): `capture` publishes windows, `worker`
scores them from an MQTT 5 shared subscription, `alarms` turns everyone's scores into alarms.
`all` (the default) is the single-box daemon in monitor/daemon/app.py.

Topics, under `<prefix>/<node>/<source>/` where node is the capture box's node:
  window   QoS 1  one window with its hop and alarm settings (monitor/daemon/windowwire.py),
                  capture -> `$share/<group>/...`
  score    QoS 1  Score.to_json() plus seq, hop_s, machine_id, model_key, worker, alarm
  alarm    retained ON | OFF, and event: as the single-box daemon, from the alarm stage
  event    type sensor_fault, and state (retained): from the capture box, as the single box
  evidence QoS 1  {"id", "source", "window_start", "clip", "image": null}: the capture box's
           clip of an alarm start it saw on `event` (roles/capture_evidence.py)
Home Assistant discovery (mqtt.discovery) comes from the capture box, which knows its sources.
"""

ROLES = ("all", "capture", "worker", "alarms")


def run_role(config, shutdown_hook) -> int:
    """Run a distributed role until stopped; `shutdown_hook(stop)` lets the caller's signal
    handler call `stop()`. Returns the exit code."""
    if config.role == "capture":
        from monitor.daemon.roles.capture import CaptureRole as cls
    elif config.role == "worker":
        from monitor.daemon.roles.worker import WorkerRole as cls
    else:
        from monitor.daemon.roles.alarm_stage import AlarmStageRole as cls
    role = cls(config)
    shutdown_hook(role.request_stop)
    return role.run()
