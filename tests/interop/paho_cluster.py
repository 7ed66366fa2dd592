"""paho-mqtt across the nodes of a Tern cluster.

usage: paho_cluster.py PUB_PORT SUB_PORT_1 SUB_PORT_2 {3,4,5}

A publisher on the first node, at the given MQTT version (3.1, 3.1.1, 5.0), publishes 10
messages at each QoS; a subscriber on each of the two other nodes (QoS 2 subscription)
receives each message once, at the QoS it was published with, in order per QoS. Then the
subscriber on the last node disconnects with a persistent session, 5 QoS 1 messages are
published on the first node, and on reconnecting to its node it finds its session
(session present) and the 5 messages. Exits non-zero, saying what went wrong, otherwise.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pub_port, sub1, sub2 = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
level = sys.argv[4]
proto = {"3": mqtt.MQTTv31, "4": mqtt.MQTTv311, "5": mqtt.MQTTv5}[level]
v5 = proto == mqtt.MQTTv5
TIMEOUT = 20
TOPIC = f"cl/v{level}"
failures = []


class Sub:
    def __init__(self, port, client_id):
        self.port, self.received, self.lock = port, [], threading.Lock()
        self.connected, self.subscribed = threading.Event(), threading.Event()
        self.session_present = None
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=proto,
            **({} if v5 else {"clean_session": False}),
        )
        self.c.on_connect = self.on_connect
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self.on_message

    def on_connect(self, client, userdata, flags, reason_code, properties):
        self.session_present = flags.session_present
        self.connected.set()

    def on_message(self, client, userdata, msg):
        with self.lock:
            self.received.append((msg.payload.decode(), msg.qos))

    def connect(self, clean):
        self.connected.clear()
        kwargs = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kwargs = {"clean_start": clean, "properties": props}
        self.c.connect("127.0.0.1", self.port, keepalive=30, **kwargs)
        self.c.loop_start()
        if not self.connected.wait(TIMEOUT):
            failures.append(f"no CONNACK from port {self.port}")

    def got(self):
        with self.lock:
            return list(self.received)


def wait_for(pred, what):
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    failures.append(what)
    return False


subs = [Sub(sub1, f"paho-{level}-b"), Sub(sub2, f"paho-{level}-c")]
for s in subs:
    s.connect(True)
    s.c.subscribe(TOPIC, qos=2)
    if not s.subscribed.wait(TIMEOUT):
        failures.append(f"no SUBACK from port {s.port}")
# The subscriptions reach the other nodes.
time.sleep(1.0)

pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-{level}-pub", protocol=proto)
pub.connect("127.0.0.1", pub_port, keepalive=30)
pub.loop_start()
sent = []
for qos in (0, 1, 2):
    for i in range(10):
        payload = f"q{qos}-{i}"
        info = pub.publish(TOPIC, payload, qos=qos)
        info.wait_for_publish(TIMEOUT)
        sent.append((payload, qos))

for n, s in enumerate(subs):
    if not wait_for(lambda s=s: len(s.got()) >= len(sent), f"node {n + 2}: {len(s.got())} of {len(sent)} arrived"):
        continue
    time.sleep(0.3)  # a late duplicate would show
    got = s.got()
    if sorted(got) != sorted(sent):
        failures.append(f"node {n + 2}: got {sorted(got)} not {sorted(sent)}")
    for qos in (0, 1, 2):
        order = [p for p, q in got if q == qos]
        if order != [p for p, q in sent if q == qos]:
            failures.append(f"node {n + 2}: QoS {qos} out of order: {order}")

# The last subscriber goes away with its session; messages wait for it on its node.
last = subs[-1]
last.c.disconnect()
last.c.loop_stop()
time.sleep(0.3)
with last.lock:
    last.received.clear()
queued = []
for i in range(5):
    payload = f"while-away-{i}"
    pub.publish(TOPIC, payload, qos=1).wait_for_publish(TIMEOUT)
    queued.append((payload, 1))
time.sleep(0.5)
last.connect(False)
# MQTT 3.1's CONNACK has no session-present flag: its messages tell.
if level != "3" and not last.session_present:
    failures.append("reconnected without its session (session present 0)")
if wait_for(lambda: len(last.got()) >= len(queued), f"after reconnecting: {len(last.got())} of 5 queued"):
    if last.got() != queued:
        failures.append(f"queued messages: {last.got()}")

pub.disconnect()
pub.loop_stop()
for s in subs:
    s.c.disconnect()
    s.c.loop_stop()
if failures:
    print("FAILED:", *failures, sep="\n  ")
    sys.exit(1)
print(f"paho MQTT {level}: {len(sent)} messages across nodes at QoS 0/1/2 to 2 nodes, 5 queued for a persistent session: ok")
