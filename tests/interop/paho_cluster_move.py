"""paho-mqtt: a persistent session moving between the nodes of a Tern cluster.

usage: paho_cluster_move.py PORT_A PORT_B PORT_C {4,5} [N [PID_A,PID_B,PID_C]]

A subscriber with a persistent session (QoS 2 subscription to `mv/#`) connects to node a.
Publishers on all three nodes publish N numbered messages each at QoS 1 and at QoS 2 (one
client per node and QoS), paced, while the subscriber moves: from a to b (its socket
dropped, without DISCONNECT), from b to c (DISCONNECT), from c back to a (dropped). The
same paho client object reconnects each time (it keeps its inbound QoS 2 ids, as a client
with a persistent session must). A QoS 2 publisher with a persistent session of its own
moves along with it: before each move it writes 20 PUBLISH packets without reading what
comes back, so the node routes them and answers PUBREC into a socket that is then
dropped; on the next node paho sends them again (DUP, same packet ids), and that node
must answer from the inbound QoS 2 ids the session brought, so nothing arrives twice. With the nodes' process ids, the node the subscriber
moves to is paused (SIGSTOP) for 1.5 s just before, so that its reader of the cluster's
stream is behind the node the session leaves when the session arrives (the seam from the
other side). Every CONNACK after the first must say session present;
every QoS 2 message must arrive exactly once and every QoS 1 message at least once, each
publisher's messages in the order published. Prints the counts; exits non-zero, saying
what went wrong, otherwise.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ports = [int(p) for p in sys.argv[1:4]]
level = sys.argv[4]
N = int(sys.argv[5]) if len(sys.argv) > 5 else 300
pids = [int(p) for p in sys.argv[6].split(",")] if len(sys.argv) > 6 else None
proto = {"4": mqtt.MQTTv311, "5": mqtt.MQTTv5}[level]
v5 = proto == mqtt.MQTTv5
TIMEOUT = 40
failures = []


class Sub:
    def __init__(self, client_id=None):
        self.received, self.lock = [], threading.Lock()
        self.connected, self.subscribed = threading.Event(), threading.Event()
        self.session_present = None
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"mover-{level}",
            protocol=proto,
            **({} if v5 else {"clean_session": False}),
        )
        self.c.on_connect = self.on_connect
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self.on_message

    def on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            failures.append(f"CONNACK {reason_code}")
        self.session_present = flags.session_present
        self.connected.set()

    def on_message(self, client, userdata, msg):
        with self.lock:
            self.received.append((msg.payload.decode(), msg.qos))

    def connect(self, port, clean):
        self.connected.clear()
        kwargs = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kwargs = {"clean_start": clean, "properties": props}
        self.c.connect("127.0.0.1", port, keepalive=30, **kwargs)
        self.c.loop_start()
        if not self.connected.wait(TIMEOUT):
            failures.append(f"no CONNACK from port {port}")
            return False
        return True

    def drop(self):
        """The connection ends without DISCONNECT: the socket is shut."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(2)
            except OSError:
                pass
            sock.close()

    def leave(self):
        self.c.disconnect()
        self.c.loop_stop()

    def got(self):
        with self.lock:
            return list(self.received)


def publisher(port, node, qos, done):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mv-pub-{node}-{qos}", protocol=proto)
    c.max_inflight_messages_set(20)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    infos = []
    for i in range(N):
        infos.append(c.publish(f"mv/{node}/{qos}", f"{node}-{qos}-{i}", qos=qos))
        time.sleep(0.008)
    for info in infos:
        info.wait_for_publish(TIMEOUT)
        if not info.is_published():
            failures.append(f"publisher {node} QoS {qos}: message {info.mid} not acknowledged")
            break
    c.disconnect()
    c.loop_stop()
    done.set()


s = Sub()
s.connect(ports[0], True)
s.c.subscribe("mv/#", qos=2)
if not s.subscribed.wait(TIMEOUT):
    failures.append("no SUBACK")
time.sleep(1.0)  # the subscription reaches the other nodes

# The moving publisher: connected to a, moving with the subscriber.
mp = Sub(f"mover-pub-{level}")
mp.connect(ports[0], True)
BURST = 20
burst_no = [0]


def burst():
    """BURST QoS 2 messages written without reading the answers (PUBREC unread)."""
    mp.c.loop_stop()
    for _ in range(BURST):
        mp.c.publish("mv/m/2", f"m-2-{burst_no[0]}", qos=2)
        burst_no[0] += 1
    for _ in range(50):
        mp.c.loop_write()
    time.sleep(0.3)


dones = []
for node, port in zip("abc", ports):
    for qos in (1, 2):
        done = threading.Event()
        dones.append(done)
        threading.Thread(target=publisher, args=(port, node, qos, done), daemon=True).start()

moves = [("drop", 1), ("leave", 2), ("drop", 0)]
for how, to in moves:
    time.sleep(0.6)
    if pids:
        import os
        import signal

        os.kill(pids[to], signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(pids[to], signal.SIGCONT)
    if how == "drop":
        s.drop()
    else:
        s.leave()
    burst()
    mp.drop()
    time.sleep(0.1)
    if not mp.connect(ports[to], False) or not mp.session_present:
        failures.append(f"the moving publisher found no session on node {'abc'[to]}")
    before = len(s.got())
    if not s.connect(ports[to], False):
        break
    print(f"moved ({how}) to node {'abc'[to]}: session present {s.session_present}, {before} received before")
    if not s.session_present:
        failures.append(f"no session present on node {'abc'[to]}")

for d in dones:
    if not d.wait(TIMEOUT):
        failures.append("a publisher did not finish")
mp.c.loop_start()
time.sleep(1.0)

want = {(node, qos): [f"{node}-{qos}-{i}" for i in range(N)] for node in "abc" for qos in (1, 2)}
want[("m", 2)] = [f"m-2-{i}" for i in range(burst_no[0])]


def complete():
    got = s.got()
    return all(set(w) <= {p for p, _ in got} for w in want.values())


deadline = time.time() + TIMEOUT
while time.time() < deadline and not complete():
    time.sleep(0.1)
time.sleep(0.5)  # a late duplicate would show
got = s.got()
duplicates = {1: 0, 2: 0}
for (node, qos), w in want.items():
    mine = [p for p, q in got if p.startswith(f"{node}-{qos}-")]
    missing = set(w) - set(mine)
    if missing:
        failures.append(f"{node} QoS {qos}: {len(missing)} missing, e.g. {sorted(missing)[:3]}")
    duplicates[qos] += len(mine) - len(set(mine))
    # Per publisher, in order: first arrivals in publishing order, and at QoS 2 nothing else.
    firsts, seen = [], set()
    for p in mine:
        if p not in seen:
            seen.add(p)
            firsts.append(p)
    if firsts != [p for p in w if p in seen]:
        failures.append(f"{node} QoS {qos}: out of order")
print(f"received {len(got)}: QoS 1 duplicates {duplicates[1]}, QoS 2 duplicates {duplicates[2]}")
if duplicates[2]:
    failures.append(f"{duplicates[2]} QoS 2 messages arrived twice")
s.leave()
mp.leave()
if failures:
    print("FAILED: " + "; ".join(failures))
    sys.exit(1)
print("ok")
