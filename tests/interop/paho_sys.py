"""Reads Tern's $SYS topics with paho-mqtt (PyPI) as a client nobody here wrote.

usage: paho_sys.py PORT USERNAME SECONDS

Connects (MQTT 3.1.1, USERNAME unless it is "-"), subscribes to $SYS/# at QoS 0, collects
what arrives for SECONDS and prints one line per fact: "granted CODE", then "message
TOPIC<TAB>PAYLOAD" (the last payload of each topic) and "retained TOPIC" (topics that
arrived with RETAIN set). Exits 1 if it cannot connect or subscribe.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt

PORT, USER, SECONDS = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sys-reader-{USER}",
                protocol=mqtt.MQTTv311, reconnect_on_failure=False)
if USER != "-":
    c.username_pw_set(USER)
connected, subscribed = threading.Event(), threading.Event()
result = {"granted": None, "messages": {}, "retained": []}


def on_connect(client, userdata, flags, rc, props):
    connected.set()


def on_subscribe(client, userdata, mid, rcs, props):
    result["granted"] = [int(getattr(r, "value", r)) for r in rcs]
    subscribed.set()


def on_message(client, userdata, m):
    result["messages"][m.topic] = m.payload.decode()
    if m.retain and m.topic not in result["retained"]:
        result["retained"].append(m.topic)


c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect("127.0.0.1", PORT, keepalive=30)
c.loop_start()
if not connected.wait(10):
    print("no CONNACK", file=sys.stderr)
    sys.exit(1)
c.subscribe("$SYS/#", qos=0)
if not subscribed.wait(10):
    print("no SUBACK", file=sys.stderr)
    sys.exit(1)
time.sleep(SECONDS)
c.disconnect()
c.loop_stop()
print("granted " + " ".join(str(g) for g in result["granted"]))
for topic, payload in sorted(result["messages"].items()):
    print(f"message {topic}\t{payload}")
for topic in result["retained"]:
    print(f"retained {topic}")
