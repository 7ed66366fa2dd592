"""Drive paho-mqtt through one session against a scripted server, for byte captures.

usage: paho_session.py PORT {3,4,5}

Exercises CONNECT (will, user name, password), SUBSCRIBE, receiving QoS 1 and QoS 2
messages (PUBACK, PUBREC, PUBCOMP), publishing at QoS 0, 1 and 2 (PUBREL), UNSUBSCRIBE,
PINGREQ and DISCONNECT. Exits non-zero if any step does not complete, so the server's
answers (written by tern-codec) are checked by a client nobody here wrote.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

port, level = int(sys.argv[1]), sys.argv[2]
proto = {"3": mqtt.MQTTv31, "4": mqtt.MQTTv311, "5": mqtt.MQTTv5}[level]
v5 = proto == mqtt.MQTTv5
TIMEOUT = 10

connected, subscribed, unsubscribed = threading.Event(), threading.Event(), threading.Event()
received = []
failures = []


def on_connect(client, userdata, flags, reason_code, properties):
    if reason_code != 0:
        failures.append(f"connect refused: {reason_code}")
    connected.set()


def on_subscribe(client, userdata, mid, reason_codes, properties):
    granted = [int(getattr(rc, "value", rc)) for rc in reason_codes]
    if granted != [1, 2]:
        failures.append(f"unexpected grants {granted}")
    subscribed.set()


def on_unsubscribe(client, userdata, mid, reason_codes, properties):
    unsubscribed.set()


def on_message(client, userdata, msg):
    received.append((msg.topic, msg.qos, msg.payload))


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tern-capture", protocol=proto)
client.on_connect, client.on_subscribe = on_connect, on_subscribe
client.on_unsubscribe, client.on_message = on_unsubscribe, on_message
client.username_pw_set("user", "secret")
will_props = None
if v5:
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 5
    will_props.ContentType = "text/plain"
client.will_set("tern/will", b"gone", qos=1, retain=True, properties=will_props)

connect_props = None
if v5:
    connect_props = Properties(PacketTypes.CONNECT)
    connect_props.SessionExpiryInterval = 300
    connect_props.ReceiveMaximum = 20
    connect_props.UserProperty = ("k", "v1")
    connect_props.UserProperty = ("k", "v2")
client.connect("127.0.0.1", port, keepalive=30, properties=connect_props)
client.loop_start()


def wait(event, what):
    if not event.wait(TIMEOUT):
        failures.append(f"timed out waiting for {what}")
        finish()


def finish():
    client.loop_stop()
    for f in failures:
        print(f, file=sys.stderr)
    sys.exit(1 if failures else 0)


wait(connected, "CONNACK")
if v5:
    client.subscribe([
        ("tern/a/+", SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True,
                                      retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)),
        ("tern/b/#", SubscribeOptions(qos=2)),
    ])
else:
    client.subscribe([("tern/a/+", 1), ("tern/b/#", 2)])
wait(subscribed, "SUBACK")

deadline = time.monotonic() + TIMEOUT
while len(received) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
expected = [("tern/a/s1", 1, b"from server q1"), ("tern/b/s2", 2, b"from server q2")]
if sorted(received) != expected:
    failures.append(f"received {received}, expected {expected}")

publish_props = None
if v5:
    publish_props = Properties(PacketTypes.PUBLISH)
    publish_props.MessageExpiryInterval = 120
    publish_props.ResponseTopic = "tern/reply"
    publish_props.CorrelationData = b"\x00\x01"
    publish_props.UserProperty = ("trace", "abc")
    publish_props.PayloadFormatIndicator = 1
client.publish("tern/x/q0", b"qos zero", qos=0)
client.publish("tern/x/q1", b"qos one", qos=1, properties=publish_props).wait_for_publish(TIMEOUT)
client.publish("tern/x/q2", b"qos two", qos=2, retain=True).wait_for_publish(TIMEOUT)

client.unsubscribe(["tern/a/+", "tern/b/#"])
wait(unsubscribed, "UNSUBACK")
# paho has no public ping call; its keepalive path is this method.
client._send_pingreq()
time.sleep(0.2)
client.disconnect()
finish()
