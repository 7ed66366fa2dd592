"""Claims about the Tern broker, checked with paho-mqtt (PyPI) as the client.

usage: paho_broker.py PORT {3,4,5} CLAIM

Exits 0 if the claim holds; prints what went wrong and exits 1 otherwise.
"""
import socket
import struct
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PORT, LEVEL, CLAIM = int(sys.argv[1]), sys.argv[2], sys.argv[3]
V5 = LEVEL == "5"
PROTO = {"3": mqtt.MQTTv31, "4": mqtt.MQTTv311, "5": mqtt.MQTTv5}[LEVEL]
TIMEOUT = 10
_seq = [0]


def fail(msg):
    print(f"FAIL [{CLAIM} v{LEVEL}]: {msg}", file=sys.stderr)
    sys.exit(1)


class C:
    """A paho client with blocking helpers."""

    def __init__(self, client_id=None, clean=True, expiry=None, will=None, will_props=None):
        _seq[0] += 1
        self.id = client_id if client_id is not None else f"{CLAIM}-{LEVEL}-{_seq[0]}"
        kw = {} if V5 else {"clean_session": clean}
        # No automatic reconnect: a claim that drops a connection means it to stay dropped.
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=PROTO,
                             reconnect_on_failure=False, **kw)
        self.clean, self.expiry = clean, expiry
        self.messages, self.connected, self.subscribed = [], threading.Event(), threading.Event()
        self.disconnected = threading.Event()
        self.session_present, self.rc, self.disconnect_rc, self.granted = None, None, None, None
        self.assigned = None
        self.c.on_connect = self._on_connect
        self.arrivals = []
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect
        self.unsubscribed, self.unsub_rcs = threading.Event(), None
        self.c.on_unsubscribe = self._on_unsubscribe
        if will:
            self.c.will_set(*will, properties=will_props)

    def _on_connect(self, c, u, flags, rc, props):
        self.session_present, self.rc = flags.session_present, rc
        if props is not None and hasattr(props, "AssignedClientIdentifier"):
            self.assigned = props.AssignedClientIdentifier
        self.connected.set()

    def _on_subscribe(self, c, u, mid, rcs, props):
        self.granted = [int(getattr(r, "value", r)) for r in rcs]
        self.subscribed.set()

    def _on_message(self, c, u, m):
        self.arrivals.append(time.monotonic())
        self.messages.append((m.topic, m.payload, m.qos, m.retain))

    def _on_unsubscribe(self, c, u, mid, rcs, props):
        self.unsub_rcs = [int(getattr(r, "value", r)) for r in rcs]
        self.unsubscribed.set()

    def _on_disconnect(self, c, u, flags, rc, props):
        self.disconnect_rc = rc
        self.disconnected.set()

    def connect(self, expect_ok=True, keepalive=30):
        props = None
        if V5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.expiry if self.expiry is not None else 0
            self.c.connect("127.0.0.1", PORT, keepalive=keepalive, clean_start=self.clean, properties=props)
        else:
            self.c.connect("127.0.0.1", PORT, keepalive=keepalive)
        self.c.loop_start()
        if not self.connected.wait(TIMEOUT):
            fail(f"{self.id}: no CONNACK")
        if expect_ok and self.rc != 0:
            fail(f"{self.id}: refused {self.rc}")
        return self

    def sub(self, topic, qos):
        self.subscribed.clear()
        self.c.subscribe(topic, qos)
        if not self.subscribed.wait(TIMEOUT):
            fail(f"no SUBACK for {topic}")
        return self.granted

    def pub(self, topic, payload, qos, retain=False):
        info = self.c.publish(topic, payload, qos, retain)
        if qos > 0:
            info.wait_for_publish(TIMEOUT)
            if not info.is_published():
                fail(f"publish to {topic} at QoS {qos} not acknowledged")

    def unsub(self, topic):
        self.unsubscribed.clear()
        self.c.unsubscribe(topic)
        if not self.unsubscribed.wait(TIMEOUT):
            fail(f"no UNSUBACK for {topic}")
        return self.unsub_rcs

    def stop(self, reason=None):
        if reason is None:
            self.c.disconnect()
        else:
            from paho.mqtt.reasoncodes import ReasonCode
            self.c.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=reason))
        if not self.disconnected.wait(TIMEOUT):
            fail(f"{self.id}: DISCONNECT not completed")
        self.c.loop_stop()

    def drop(self):
        """The network connection ends without DISCONNECT. Returns when it did."""
        self.c.socket().shutdown(socket.SHUT_RDWR)
        at = time.monotonic()
        self.c.loop_stop()
        return at

    def expect_none(self, settle=0.5):
        """Nothing arrives within `settle` seconds (the broker is local: anything routed
        would arrive within milliseconds)."""
        time.sleep(settle)
        return self.messages

    def wait_messages(self, n, settle=0.3):
        deadline = time.monotonic() + TIMEOUT
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(settle)  # anything extra (a duplicate) would arrive here
        return self.messages


def raw_connect_with_will_then_drop(client_id, will_topic):
    """A client nobody wrote at all: CONNECT with a will over a bare socket, then the
    socket is closed without DISCONNECT."""
    s = socket.create_connection(("127.0.0.1", PORT))
    def utf(x):
        b = x.encode()
        return struct.pack("!H", len(b)) + b
    flags = 0x02 | 0x04  # clean, will (QoS 0)
    if V5:
        var = utf("MQTT") + bytes([5, flags]) + struct.pack("!H", 30) + b"\x00"
        payload = utf(client_id) + b"\x00" + utf(will_topic) + utf("gone")
    else:
        var = utf("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
        payload = utf(client_id) + utf(will_topic) + utf("gone")
    body = var + payload
    s.sendall(bytes([0x10, len(body)]) + body)
    s.recv(16)  # CONNACK
    s.close()


def claim_qos_downgrade_table():
    sub = C().connect()
    for s in range(3):
        for p in range(3):
            sub.sub(f"dg/{p}{s}", s)
    pub = C().connect()
    for s in range(3):
        for p in range(3):
            pub.pub(f"dg/{p}{s}", f"{p}{s}", p)
    got = sub.wait_messages(9)
    table = sorted((t, q) for t, _, q, _ in got)
    want = sorted((f"dg/{p}{s}", min(p, s)) for p in range(3) for s in range(3))
    if table != want:
        fail(f"got {table}, want {want}")


def claim_overlapping_subscriptions_deliver_once_at_max_qos():
    sub = C().connect()
    sub.sub("ov/+", 0)
    sub.sub("ov/#", 2)
    sub.sub("ov/x", 1)
    C().connect().pub("ov/x", "m", 2)
    got = sub.wait_messages(1)
    if [(t, q) for t, _, q, _ in got] != [("ov/x", 2)]:
        fail(f"got {got}")


def claim_plus_plus_does_not_match_sys_topics():
    sub = C().connect()
    sub.sub("+/+", 0)
    pub = C().connect()
    pub.pub("$SYS/x", "sys", 1)
    pub.pub("a/x", "plain", 1)
    got = sub.wait_messages(1)
    if [t for t, _, _, _ in got] != ["a/x"]:
        fail(f"got {got}")


def claim_offline_messages_are_queued_and_delivered_with_session_present():
    cid = f"offline-{LEVEL}"
    # 5.0: a clean start with a session expiry; 3.1.1: clean session 0 from the start.
    a = C(cid, clean=V5, expiry=300).connect()
    a.sub("q/#", 1)
    a.stop()
    pub = C().connect()
    for i in range(3):
        pub.pub("q/x", f"m{i}", 1)
    b = C(cid, clean=False, expiry=300)
    b.connect()
    if not b.session_present:
        fail("session present not set")
    got = [p.decode() for _, p, _, _ in b.wait_messages(3)]
    if got != ["m0", "m1", "m2"]:
        fail(f"got {got}")


def claim_clean_start_discards_the_session_and_its_queue():
    cid = f"clean-{LEVEL}"
    a = C(cid, clean=V5, expiry=300).connect()
    a.sub("cs/#", 1)
    a.stop()
    C().connect().pub("cs/x", "queued", 1)
    b = C(cid, clean=True, expiry=0).connect()
    if b.session_present:
        fail("session present after a clean start")
    if b.expect_none():
        fail(f"messages from the discarded session arrived: {b.messages}")
    C().connect().pub("cs/x", "after", 1)
    if b.expect_none():
        fail(f"the discarded subscription still matched: {b.messages}")


def claim_will_is_published_on_abnormal_disconnect_not_on_disconnect():
    watcher = C().connect()
    watcher.sub("will/#", 0)
    raw_connect_with_will_then_drop(f"w1-{LEVEL}", "will/abnormal")
    polite = C(will=("will/normal", "gone", 0)).connect()
    polite.stop()
    got = watcher.wait_messages(1, settle=0.5)
    if [t for t, _, _, _ in got] != ["will/abnormal"]:
        fail(f"got {got}")


def claim_retained_messages_are_set_replaced_and_cleared():
    pub = C().connect()
    pub.pub("r/a", "one", 1, retain=True)
    pub.pub("r/a", "two", 1, retain=True)
    s1 = C().connect()
    s1.sub("r/#", 1)
    got = s1.wait_messages(1)
    if [(t, p, r) for t, p, _, r in got] != [("r/a", b"two", True)]:
        fail(f"retained: {got}")
    pub.pub("r/a", "", 1, retain=True)
    s2 = C().connect()
    s2.sub("r/#", 1)
    if s2.expect_none():
        fail(f"cleared retained still delivered: {s2.messages}")
    # Live forwarding clears the RETAIN flag.
    s1.messages.clear()
    pub.pub("r/b", "live", 0, retain=True)
    got = s1.wait_messages(1)
    if [r for _, _, _, r in got] != [False]:
        fail(f"forwarded retain flag: {got}")


def claim_a_second_connection_with_the_same_client_id_takes_over():
    first = C(f"dup-{LEVEL}").connect()
    second = C(f"dup-{LEVEL}").connect()
    if not first.disconnected.wait(TIMEOUT):
        fail("the first connection was not closed")
    if V5 and int(getattr(first.disconnect_rc, "value", first.disconnect_rc)) != 0x8E:
        fail(f"reason {first.disconnect_rc}, want 0x8E")
    second.sub("t", 0)


def claim_empty_client_id_rules():
    if V5:
        c = C(client_id="", clean=True).connect()
        if not c.assigned:
            fail("no Assigned Client Identifier")
    else:
        ok = C(client_id="", clean=True).connect()
        ok.stop()
        # paho refuses to send this itself: a bare CONNECT, empty id, clean session 0.
        s = socket.create_connection(("127.0.0.1", PORT))
        body = struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x00]) + struct.pack("!H", 30) + struct.pack("!H", 0)
        s.sendall(bytes([0x10, len(body)]) + body)
        connack = s.recv(4)
        if connack != bytes([0x20, 0x02, 0x00, 0x02]):
            fail(f"want CONNACK return code 2 (identifier rejected), got {connack.hex()}")
        if s.recv(1) != b"":
            fail("connection not closed after the refusal")


def claim_a_publisher_with_64_qos2_messages_in_flight_loses_nothing():
    sub = C().connect()
    sub.sub("burst/#", 2)
    pub = C()
    pub.c.max_inflight_messages_set(64)
    pub.connect()
    infos = [pub.c.publish("burst/x", f"{i}", 2) for i in range(64)]
    for info in infos:
        info.wait_for_publish(TIMEOUT)
    got = [int(p) for _, p, _, _ in sub.wait_messages(64)]
    if got != list(range(64)):
        fail(f"got {len(got)} messages: {got[:10]}...")


def claim_unsubscribe_stops_delivery():
    sub = C().connect()
    sub.sub("u/+", 1)
    pub = C().connect()
    pub.pub("u/a", "before", 1)
    sub.wait_messages(1, settle=0)
    rcs = sub.unsub("u/+")
    if V5 and rcs != [0]:
        fail(f"UNSUBACK reasons {rcs}, want [0]")
    pub.pub("u/a", "after", 1)
    got = [p for _, p, _, _ in sub.expect_none()]
    if got != [b"before"]:
        fail(f"got {got}")
    if V5:
        rcs = sub.unsub("never/subscribed")
        if rcs != [0x11]:
            fail(f"UNSUBACK for an unknown filter {rcs}, want [0x11] No subscription existed")


def claim_disconnect_with_will_0x04_publishes_the_will():
    watcher = C().connect()
    watcher.sub("will/#", 0)
    c = C(will=("will/on-purpose", "asked", 0)).connect()
    c.stop(reason=0x04)
    got = watcher.wait_messages(1)
    if [(t, p) for t, p, _, _ in got] != [("will/on-purpose", b"asked")]:
        fail(f"got {got}")


def delayed_will(cid, delay):
    props = Properties(PacketTypes.WILLMESSAGE)
    props.WillDelayInterval = delay
    return C(cid, clean=True, expiry=60, will=(f"will/{cid}", "late", 0), will_props=props)


def claim_will_delay_holds_the_will_and_a_reconnect_in_time_cancels_it():
    watcher = C().connect()
    watcher.sub("will/#", 0)
    back = delayed_will("back", 2).connect()
    slow = delayed_will("slow", 2).connect()
    back.drop()
    dropped = slow.drop()
    back = C("back", clean=False, expiry=60).connect()
    if not back.session_present:
        fail("the session did not wait for its client")
    got = watcher.wait_messages(1, settle=2.5)  # the will of "back" would be due in here
    if [t for t, _, _, _ in got] != ["will/slow"]:
        fail(f"want only the will of the client that stayed away, got {got}")
    waited = watcher.arrivals[0] - dropped
    if waited < 1.9:
        fail(f"the will came {waited:.2f} s after the connection ended, before its 2 s delay")


def claim_session_expiry_ends_an_offline_session():
    a = C("short", clean=True, expiry=1).connect()
    a.sub("se/#", 1)
    a.stop()
    b = C("long", clean=True, expiry=60).connect()
    b.sub("se/#", 1)
    b.stop()
    time.sleep(2.0)  # past 1 s of expiry, and the broker's 0.5 s timer
    a = C("short", clean=False, expiry=60).connect()
    if a.session_present:
        fail("the session outlived its expiry interval")
    b = C("long", clean=False, expiry=60).connect()
    if not b.session_present:
        fail("the other session should still exist")


def claim_offline_queue_is_bounded_and_drops_the_oldest():
    # The broker runs with max_queued_messages = 3.
    cid = f"bounded-{LEVEL}"
    a = C(cid, clean=V5, expiry=300).connect()
    a.sub("b/#", 1)
    a.stop()
    pub = C().connect()
    for i in range(5):
        pub.pub("b/x", f"m{i}", 1)
    b = C(cid, clean=False, expiry=300).connect()
    got = [p.decode() for _, p, _, _ in b.wait_messages(3)]
    if got != ["m2", "m3", "m4"]:
        fail(f"got {got}, want the newest three")


def claim_will_is_published_when_keepalive_expires():
    watcher = C().connect()
    watcher.sub("will/#", 0)
    silent = C(will=("will/silent", "timed out", 0)).connect(keepalive=1)
    silent.c.loop_stop()  # the socket stays open, but no PINGREQ is ever sent again
    stopped = time.monotonic()
    got = watcher.wait_messages(1, settle=0)
    if [(t, p) for t, p, _, _ in got] != [("will/silent", b"timed out")]:
        fail(f"got {got}")
    waited = watcher.arrivals[0] - stopped
    # 1.5 x the 1 s keep alive after the last packet, checked on the broker's 0.5 s timer.
    if not 1.0 <= waited <= 4.0:
        fail(f"the will came {waited:.2f} s after the client went silent")


def claim_stopping_the_broker_sends_0x8b():
    """Run by the test, which stops the broker when this prints 'ready'."""
    c = C().connect()
    print("ready", flush=True)
    if not c.disconnected.wait(TIMEOUT):
        fail("no disconnect when the broker stopped")
    rc = int(getattr(c.disconnect_rc, "value", c.disconnect_rc))
    if V5 and rc != 0x8B:
        fail(f"DISCONNECT reason 0x{rc:02X}, want 0x8B Server shutting down")


globals()[f"claim_{CLAIM}"]()
print(f"ok [{CLAIM} v{LEVEL}]")
