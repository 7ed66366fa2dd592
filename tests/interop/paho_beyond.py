"""paho-mqtt (MQTT 5) clients for crates/tern/tests/beyond.rs: idempotency keys, delivery
receipts, topic policies, and paho's own QoS 2 replay after PUBREL.

  paho_beyond.py pub PORT CLIENT TOPIC QOS PAYLOAD [--key K] [--receipt KIND --response R
                 --corr C --receipts N] [--user U --pw P] [--persistent] [--expiry S]
      publishes one message; prints "ack RC" (QoS 1/2: the PUBACK/PUBREC reason code), or
      "disconnect RC" if the broker closed the connection, then "receipt KIND PAYLOAD" for
      each receipt (up to N, 10 s), then "done".
  paho_beyond.py sub PORT CLIENT FILTER QOS [--count N] [--timeout S] [--persistent]
                 [--subscribe-only]
      prints "ready" after SUBACK, then "msg QOS TOPIC EXPIRY PAYLOAD" per message, until
      N messages or S seconds of quiet; with --subscribe-only it leaves after SUBACK (a
      persistent session keeps the subscription).
  paho_beyond.py replay PORT CLIENT TOPIC [--key K]
      a QoS 2 publish through a proxy that passes the PUBREL to the broker, loses the
      PUBCOMP, then cuts the next two connections: paho 2.2 then sends the PUBLISH again
      (a new message to the broker: MQTT-4.3.3). Prints "done" once paho has PUBCOMP.
"""

import argparse
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def out(*a):
    print(*a, flush=True)


def client(args, clean):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=args.client,
        protocol=mqtt.MQTTv5,
    )
    if getattr(args, "user", None):
        c.username_pw_set(args.user, args.pw)
    props = Properties(PacketTypes.CONNECT)
    if not clean:
        props.SessionExpiryInterval = 3600
    return c, props


def cmd_pub(args):
    c, cprops = client(args, not args.persistent)
    receipts = []
    state = {"ack": None, "disconnect": None}
    got = threading.Event()
    acked = threading.Event()
    connected = threading.Event()
    subscribed = threading.Event()

    def on_connect(cl, ud, flags, rc, props):
        connected.set()

    def on_subscribe(cl, ud, mid, rcs, props):
        subscribed.set()

    def on_message(cl, ud, m):
        kind = ""
        for k, v in m.properties.UserProperty if hasattr(m.properties, "UserProperty") else []:
            if k == "tern-receipt":
                kind = v
        corr = getattr(m.properties, "CorrelationData", b"")
        receipts.append(kind)
        out("receipt", kind, corr.decode(), m.payload.decode())
        if len(receipts) >= args.receipts:
            got.set()

    def on_publish(cl, ud, mid, rc, props):
        if args.qos == 0:
            # Called once written: the answer, if any, is a DISCONNECT.
            return
        state["ack"] = rc.value if hasattr(rc, "value") else int(rc)
        acked.set()

    def on_disconnect(cl, ud, flags, rc, props):
        state["disconnect"] = rc.value if hasattr(rc, "value") else int(rc)
        acked.set()
        got.set()

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.on_publish = on_publish
    c.on_disconnect = on_disconnect
    c.connect("127.0.0.1", args.port, keepalive=30, clean_start=not args.persistent, properties=cprops)
    c.loop_start()
    if not connected.wait(10):
        out("error no CONNACK")
        sys.exit(1)
    if args.receipt and args.receipts > 0:
        c.subscribe(args.response, qos=1)
        subscribed.wait(10)
    p = Properties(PacketTypes.PUBLISH)
    users = []
    if args.key:
        users.append(("msg-id", args.key))
    if args.receipt:
        users.append(("tern-receipt", args.receipt))
        p.ResponseTopic = args.response
        p.CorrelationData = args.corr.encode()
    if args.expiry:
        p.MessageExpiryInterval = args.expiry
    if users:
        p.UserProperty = users
    info = c.publish(args.topic, args.payload, qos=args.qos, properties=p)
    if args.qos == 0:
        # QoS 0 has no acknowledgement: a refusal is a DISCONNECT, if any.
        acked.wait(1.5)
    else:
        acked.wait(10)
    if state["disconnect"] is not None:
        out("disconnect", state["disconnect"])
    elif args.qos > 0:
        out("ack", state["ack"])
    if args.receipt and args.receipts > 0 and state["disconnect"] is None:
        got.wait(10)
    c.disconnect()
    c.loop_stop()
    out("done")


def cmd_sub(args):
    c, cprops = client(args, not args.persistent)
    ready = threading.Event()
    lock = threading.Lock()
    state = {"n": 0, "last": time.time()}
    done = threading.Event()

    def on_connect(cl, ud, flags, rc, props):
        cl.subscribe(args.filter, qos=args.qos)

    def on_subscribe(cl, ud, mid, rcs, props):
        out("ready")
        ready.set()

    def on_message(cl, ud, m):
        with lock:
            state["n"] += 1
            state["last"] = time.time()
            expiry = getattr(m.properties, "MessageExpiryInterval", None) if m.properties else None
            out("msg", m.qos, m.topic, expiry if expiry is not None else "-", m.payload.decode())
            if args.count and state["n"] >= args.count:
                done.set()

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect("127.0.0.1", args.port, keepalive=30, clean_start=not args.persistent, properties=cprops)
    c.loop_start()
    if not ready.wait(10):
        out("error no SUBACK")
        sys.exit(1)
    if args.subscribe_only:
        c.disconnect()
        c.loop_stop()
        out("done")
        return
    while not done.is_set():
        with lock:
            quiet = time.time() - state["last"]
        if quiet > args.timeout:
            break
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    out("done", state["n"])


def packets(buf):
    """Splits whole MQTT packets off the front of buf: (list of (type, bytes), rest)."""
    found = []
    while len(buf) >= 2:
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return found, buf
            b = buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if b & 0x80 == 0:
                break
        end = i + length
        if len(buf) < end:
            break
        found.append((buf[0] >> 4, buf[:end]))
        buf = buf[end:]
    return found, buf


def cmd_replay(args):
    """paho's QoS 2 replay after PUBREL, through a proxy that loses one PUBCOMP."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    proxy_port = listener.getsockname()[1]
    state = {"pubrel_passed": False, "cut": 0}

    def pump_up(client_sock, broker_sock, conn_state):
        buf = b""
        try:
            while True:
                data = client_sock.recv(65536)
                if not data:
                    break
                buf += data
                whole, buf = packets(buf)
                for kind, raw in whole:
                    broker_sock.sendall(raw)
                    if kind == 6 and not state["pubrel_passed"]:
                        # PUBREL is with the broker: its PUBCOMP will not reach paho.
                        state["pubrel_passed"] = True
                        conn_state["lose_down"] = True
                        time.sleep(0.5)
                        raise OSError("cut")
        except OSError:
            pass
        for s in (client_sock, broker_sock):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def pump_down(client_sock, broker_sock, conn_state):
        try:
            while True:
                data = broker_sock.recv(65536)
                if not data or conn_state.get("lose_down"):
                    break
                client_sock.sendall(data)
        except OSError:
            pass

    def serve():
        while True:
            try:
                cs, _ = listener.accept()
            except OSError:
                return
            if state["pubrel_passed"] and state["cut"] < 2:
                # Two reconnects that fail: paho resets its outgoing messages each time.
                state["cut"] += 1
                cs.close()
                continue
            bs = socket.create_connection(("127.0.0.1", args.port))
            conn_state = {}
            threading.Thread(target=pump_up, args=(cs, bs, conn_state), daemon=True).start()
            threading.Thread(target=pump_down, args=(cs, bs, conn_state), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(min_delay=1, max_delay=1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    completed = threading.Event()

    def on_publish(cl, ud, mid, rc, p):
        completed.set()

    c.on_publish = on_publish
    c.connect("127.0.0.1", proxy_port, keepalive=30, clean_start=False, properties=props)
    c.loop_start()
    p = Properties(PacketTypes.PUBLISH)
    if args.key:
        p.UserProperty = [("msg-id", args.key)]
    c.publish(args.topic, "once", qos=2, properties=p)
    ok = completed.wait(30)
    time.sleep(1.0)
    c.disconnect()
    c.loop_stop()
    out("done" if ok else "error no PUBCOMP", "cut", state["cut"])


def main():
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="cmd", required=True)
    p = sp.add_parser("pub")
    p.add_argument("port", type=int)
    p.add_argument("client")
    p.add_argument("topic")
    p.add_argument("qos", type=int)
    p.add_argument("payload")
    p.add_argument("--key")
    p.add_argument("--receipt")
    p.add_argument("--response", default="")
    p.add_argument("--corr", default="")
    p.add_argument("--receipts", type=int, default=0)
    p.add_argument("--user")
    p.add_argument("--pw")
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--expiry", type=int)
    s = sp.add_parser("sub")
    s.add_argument("port", type=int)
    s.add_argument("client")
    s.add_argument("filter")
    s.add_argument("qos", type=int)
    s.add_argument("--count", type=int, default=0)
    s.add_argument("--timeout", type=float, default=2.0)
    s.add_argument("--persistent", action="store_true")
    s.add_argument("--subscribe-only", action="store_true")
    s.add_argument("--user")
    s.add_argument("--pw")
    r = sp.add_parser("replay")
    r.add_argument("port", type=int)
    r.add_argument("client")
    r.add_argument("topic")
    r.add_argument("--key")
    args = ap.parse_args()
    {"pub": cmd_pub, "sub": cmd_sub, "replay": cmd_replay}[args.cmd](args)


if __name__ == "__main__":
    main()
