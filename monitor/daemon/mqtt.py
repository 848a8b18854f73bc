"""MQTT for the daemon: `MqttPublisher` (scores, alarms, events out) and `MqttAudioSource`
(audio in). paho stays behind these two classes; the pipeline sees only the `Publisher` and
`Source` protocols.

Topics, under `<prefix>/<node>/`:
  status                 retained  online | offline (last will) | stopped (clean exit)
  <source>/score         QoS 0     Score.to_json() per window, dropped (and counted) offline
  <source>/alarm         retained  ON | OFF                 (durable outbox, QoS 1)
  <source>/event         QoS 1     AlarmEvent.to_json()     (durable outbox, QoS 1)
  <source>/state         retained  running | stalled | ended | stopped
  stats                  QoS 0     periodic JSON
"""

from monitor.daemon.mqtt_publisher import (SOURCE_STATES, MqttPublisher, check_subscription_topic,
                                           check_topic_part, check_topic_prefix, make_client)
from monitor.daemon.mqtt_source import MqttAudioSource, user_properties

__all__ = ["SOURCE_STATES", "MqttAudioSource", "MqttPublisher", "check_subscription_topic",
           "check_topic_part", "check_topic_prefix", "make_client", "user_properties"]
