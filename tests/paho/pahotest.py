"""Helpers for the paho-mqtt (Debian python3-paho-mqtt, 1.6 API) checks of outpost's broker.

Each script connects real paho clients to the gateway on --port, checks what an MQTT 5 user
would check, prints what it saw, and exits 0 only if every check held (1 otherwise).
"""
import argparse
import queue
import socket
import sys
import time

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

assert paho.mqtt.__version__.startswith("1."), "written for the paho-mqtt 1.x API"

T = 5.0
FAILED = []


def args():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    return p.parse_args()


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILED.append(what)
    return cond


def done():
    if FAILED:
        print(f"{len(FAILED)} check(s) failed", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)
    sys.exit(0)


def props(kind, **kw):
    p = Properties(kind)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def pub_props(**kw):
    return props(PacketTypes.PUBLISH, **kw)


def prop(msg, name, default=None):
    p = getattr(msg, "properties", None)
    return getattr(p, name, default) if p is not None else default


class Client:
    """A paho client on its own network thread; what it receives goes to queues."""

    def __init__(self, port, client_id, v5=True, clean_start=True, connect_props=None, will=None,
                 keepalive=60, expect_rc=0):
        self.port = port
        self.msgs = queue.Queue()
        self.acks = queue.Queue()
        self.connack = queue.Queue()
        self.disconnected = queue.Queue()
        self.v5 = v5
        if v5:
            self.c = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            self.c = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean_start)
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.msgs.put(m)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = lambda c, u, mid: self.acks.put(("pub", mid))
        self.c.on_disconnect = lambda c, u, rc, *a: self.disconnected.put(rc)
        if will:
            self.c.will_set(**will)
        if v5:
            self.c.connect("127.0.0.1", port, keepalive, clean_start=clean_start, properties=connect_props)
        else:
            self.c.connect("127.0.0.1", port, keepalive)
        self.c.loop_start()
        flags, rc, cprops = self.connack.get(timeout=T)
        self.session_present = bool(flags.get("session present"))
        self.connack_props = cprops
        rc_value = rc.value if hasattr(rc, "value") else rc
        if rc_value != expect_rc:
            raise RuntimeError(f"{client_id}: CONNACK {rc}")

    def _on_connect(self, c, u, flags, rc, properties=None):
        self.connack.put((flags, rc, properties))

    def _on_subscribe(self, c, u, mid, granted, properties=None):
        self.acks.put(("sub", mid, granted))

    def subscribe(self, topic, qos=1, options=None, properties=None):
        if self.v5:
            opts = options or SubscribeOptions(qos=qos)
            _, mid = self.c.subscribe(topic, options=opts, properties=properties)
        else:
            _, mid = self.c.subscribe(topic, qos)
        while True:
            a = self.acks.get(timeout=T)
            if a[0] == "sub" and a[1] == mid:
                return a[2]

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=T)
        if not info.is_published():
            raise RuntimeError(f"no ack for a publish to {topic!r}")
        return info

    def next(self, within=T):
        try:
            return self.msgs.get(timeout=within)
        except queue.Empty:
            return None

    def all(self, quiet=0.8):
        out = []
        while True:
            m = self.next(quiet)
            if m is None:
                return out
            out.append(m)

    def wait_for(self, pred, within=T):
        end = time.time() + within
        while time.time() < end:
            m = self.next(max(0.01, end - time.time()))
            if m is not None and pred(m):
                return m
        return None

    def disconnect(self, properties=None):
        self.c.disconnect(properties=properties) if self.v5 else self.c.disconnect()
        try:
            self.disconnected.get(timeout=T)
        except queue.Empty:
            pass
        self.c.loop_stop()

    def vanish(self):
        """The network connection breaks: no DISCONNECT."""
        self.c.loop_stop()
        s = self.c.socket()
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def describe(m):
    if m is None:
        return "nothing"
    return f"topic={m.topic!r} payload={m.payload!r} qos={m.qos} retain={m.retain} props={getattr(m, 'properties', None)}"
