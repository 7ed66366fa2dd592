"""Tern's TLS and WebSocket listeners, checked with paho-mqtt (PyPI) as the client.

usage: paho_transports.py CLAIM PORT CERT_DIR {4,5}

CERT_DIR holds ca.pem (the CA that signed the server and alice's certificates),
alice.pem/alice.key (a client certificate with CN alice) and rogue.pem/rogue.key (a client
certificate from another CA). Exits 0 if the claim holds; prints what went wrong and exits
1 otherwise.
"""
import os
import ssl
import sys
import threading

import paho.mqtt.client as mqtt

CLAIM, PORT, CERTS, LEVEL = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
PROTO = mqtt.MQTTv5 if LEVEL == "5" else mqtt.MQTTv311
TIMEOUT = 10


def fail(msg):
    print(f"FAIL [{CLAIM} v{LEVEL}]: {msg}", file=sys.stderr)
    sys.exit(1)


def cert(name):
    return os.path.join(CERTS, name)


class C:
    """A paho client on one transport, with blocking helpers."""

    def __init__(self, name, transport="tcp", tls=False, client_cert=None):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{CLAIM}-{name}",
                             protocol=PROTO, transport=transport, reconnect_on_failure=False)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        if tls:
            kw = {}
            if client_cert:
                kw = {"certfile": cert(f"{client_cert}.pem"), "keyfile": cert(f"{client_cert}.key")}
            self.c.tls_set(ca_certs=cert("ca.pem"), cert_reqs=ssl.CERT_REQUIRED, **kw)
        self.connected, self.subscribed = threading.Event(), threading.Event()
        self.rc, self.granted, self.messages = None, None, []
        self.got = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message

    def _on_connect(self, c, u, flags, rc, props):
        self.rc = int(getattr(rc, "value", rc))
        self.connected.set()

    def _on_subscribe(self, c, u, mid, rcs, props):
        self.granted = [int(getattr(r, "value", r)) for r in rcs]
        self.subscribed.set()

    def _on_message(self, c, u, m):
        with self.got:
            self.messages.append((m.topic, m.payload, m.qos))
            self.got.notify_all()

    def connect(self, timeout=TIMEOUT):
        """Connects; returns the CONNACK code, or None if the connection failed."""
        try:
            self.c.connect("localhost", PORT, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            return f"refused: {e}"
        self.c.loop_start()
        if not self.connected.wait(timeout):
            self.c.loop_stop()
            return None
        return self.rc

    def subscribe(self, topic, qos=2):
        self.subscribed.clear()
        self.c.subscribe(topic, qos)
        if not self.subscribed.wait(TIMEOUT):
            fail(f"no SUBACK for {topic}")
        return self.granted[0]

    def wait_for(self, n):
        with self.got:
            self.got.wait_for(lambda: len(self.messages) >= n, TIMEOUT)
        return self.messages

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def round_trip(**kw):
    """Every QoS through the broker and back on this transport, a 100 kB payload included."""
    sub, pub = C("sub", **kw), C("pub", **kw)
    for c in (sub, pub):
        if c.connect() != 0:
            fail(f"connect: {c.rc}")
    if sub.subscribe("t/#") != 2:
        fail(f"granted {sub.granted}")
    big = os.urandom(100_000)
    infos = [pub.c.publish(f"t/{q}", f"m{q}".encode(), qos=q) for q in (0, 1, 2)]
    infos.append(pub.c.publish("t/big", big, qos=1))
    for i in infos:
        i.wait_for_publish(TIMEOUT)
    # Order is kept within a QoS level, not across them (a QoS 2 message may be passed on
    # at PUBREL): compared sorted by topic, each exactly once and intact.
    got = sorted(sub.wait_for(4))
    want = [("t/0", b"m0", 0), ("t/1", b"m1", 1), ("t/2", b"m2", 2), ("t/big", big, 1)]
    if got != want:
        fail(f"got {[(t, len(p), q) for t, p, q in got]}")
    sub.close()
    pub.close()


def claim_tls():
    round_trip(tls=True)


def claim_ws():
    round_trip(transport="websockets")


def claim_wss():
    round_trip(transport="websockets", tls=True)


def claim_mtls_accepted_with_cn_as_username():
    # The ACL lets user alice (the certificate's CN) have alice/# and nothing else.
    c = C("alice", tls=True, client_cert="alice")
    if c.connect() != 0:
        fail(f"connect with alice's certificate: {c.rc}")
    if c.subscribe("alice/#") != 2:
        fail(f"alice/# granted {c.granted}")
    refused = c.subscribe("bob/#")
    if refused < 0x80:
        fail(f"bob/# granted {refused}: the CN was not used as the username")
    c.close()


def claim_mtls_without_certificate_is_refused():
    c = C("nocert", tls=True)
    rc = c.connect(timeout=3)
    if rc == 0:
        fail("connected without a client certificate")


def claim_mtls_with_a_certificate_from_another_ca_is_refused():
    c = C("rogue", tls=True, client_cert="rogue")
    rc = c.connect(timeout=3)
    if rc == 0:
        fail("connected with a certificate from another CA")


def claim_mtls_with_a_revoked_certificate_is_refused():
    c = C("eve", tls=True, client_cert="revoked")
    rc = c.connect(timeout=3)
    if rc == 0:
        fail("connected with a revoked certificate")


def claim_mtls_revoked_certificate_without_a_crl_is_accepted():
    c = C("eve", tls=True, client_cert="revoked")
    if c.connect() != 0:
        fail(f"connect with eve's certificate on the listener without a CRL: {c.rc}")
    c.close()


claims = {n[len("claim_"):]: f for n, f in globals().items() if n.startswith("claim_")}
if CLAIM not in claims:
    fail(f"no such claim; have {sorted(claims)}")
claims[CLAIM]()
