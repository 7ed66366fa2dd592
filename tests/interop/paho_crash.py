"""A paho-mqtt client for the crash suite (crates/tern/tests/crash.rs): a persistent
session that lives through every SIGKILL of the broker, reconnecting as paho does.

usage: paho_crash.py PORT pub NAME {4,5} QOS COUNT   publishes NAME-0, NAME-1, ... to
                                                    crash/NAME, about 1,500 a second with
                                                    at most 60 unacknowledged, until COUNT
                                                    or a line `stop` on stdin
       paho_crash.py PORT sub NAME {4,5} QOS FILTER  subscribes once (the session keeps
                                                    the subscription) and receives

Output, one line each, flushed: `a SEQ` when a publish is acknowledged (on_publish),
`done N` when all N published are, `m PAYLOAD` for each message received (for QoS 2, paho hands it
over on PUBREL and keeps the exchange's state across its reconnects), `s` for the SUBACK, `c SESSION_PRESENT`
for each CONNACK. Runs until stdin closes.

Why the publisher is QoS 1 only: paho-mqtt 2.2 resends a QoS 2 PUBLISH (DUP clear, same
packet id) after it has sent its PUBREL when it reconnects more than once (its reconnect
reset turns the "resend PUBREL" state into "publish"), which by the standard is a new
message; under repeated broker kills that doubles messages by the client's own doing.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port, role, name, level, qos = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
v5 = level == "5"
lock = threading.Lock()


def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


if v5:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
else:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=False, protocol=mqtt.MQTTv311
    )
client.reconnect_delay_set(min_delay=0.05, max_delay=0.4)
client.max_inflight_messages_set(60)
client.max_queued_messages_set(0)


def on_connect(c, userdata, flags, reason_code, properties):
    say(f"c {int(flags.session_present)}")
    if role == "sub" and not flags.session_present:
        c.subscribe(sys.argv[6], qos=qos)


def on_subscribe(c, userdata, mid, reason_codes, properties):
    say("s")


def on_message(c, userdata, msg):
    say("m " + msg.payload.decode())


unacked = {}  # mid -> seq
early = set()  # acknowledged before publish() returned (mids do not wrap: COUNT < 65535)
state = threading.Lock()  # never held while calling into paho (its callbacks hold its locks)


def on_publish(c, userdata, mid, reason_code, properties):
    with state:
        seq = unacked.pop(mid, None)
        if seq is None:
            early.add(mid)
    if seq is not None and not reason_code.is_failure:
        say(f"a {seq}")


client.on_connect, client.on_message, client.on_publish = on_connect, on_message, on_publish
client.on_subscribe = on_subscribe
props = None
if v5:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
# connect_async: the network thread connects and, like every reconnect, retries until the
# broker answers (it may be restarting at that moment: the crash suite kills it anytime).
client.connect_async("127.0.0.1", port, keepalive=30, clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
client.loop_start()

stop, closed = threading.Event(), threading.Event()


def watch_stdin():
    for line in sys.stdin:
        if line.strip() == "stop":
            stop.set()
    stop.set()
    closed.set()


threading.Thread(target=watch_stdin, daemon=True).start()

if role == "pub":
    count = int(sys.argv[6])
    seq = 0
    while seq < count and not stop.is_set():
        with state:
            open_ = len(unacked)
        for _ in range(30):
            if seq >= count or open_ >= 60:
                break
            info = client.publish(f"crash/{name}", f"{name}-{seq}", qos=qos)
            with state:
                acked = info.mid in early
                early.discard(info.mid)
                if not acked:
                    unacked[info.mid] = seq
            if acked:
                say(f"a {seq}")
            seq += 1
            open_ += 1
        time.sleep(0.02)
    while True:
        with state:
            if not unacked:
                break
        time.sleep(0.02)
    say(f"done {seq}")

closed.wait()
client.loop_stop()
