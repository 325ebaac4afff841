#!/usr/bin/python3
"""A stand-in for BlueZ on a private D-Bus, with one BLE device behind it that speaks outpost's
provisioning protocol version 2 (written from docs/provisioning.md, independently of the Rust
code), so `outpost provision ble` runs btleplug's real BlueZ code path end to end.

Serves what btleplug 0.11 / bluez-async 0.8 use: ObjectManager.GetManagedObjects on /,
org.bluez.Adapter1 (Powered, SetDiscoveryFilter, StartDiscovery, StopDiscovery), a Device1 that
appears when discovery starts and advertises the provisioning service (Connect, Disconnect,
Connected, ServicesResolved), GattService1 and two GattCharacteristic1 objects (WriteValue,
StartNotify/StopNotify, PropertiesChanged on Value), with BlueZ's errors (org.bluez.Error.*)
where BlueZ gives them. Messages travel in 20-byte pieces as `length (2) | message`.

usage: fake_bluez.py BUS_ADDRESS CODE HW_ID MODE     (MODE: ok | drop-after-pake | no-adapter)
Prints JSON lines on stdout: {"ready": true}, then what the device saw and did.
"""
import hashlib, hmac, json, os, struct, sys

import dbus
import dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SERVICE = "6f75742d-706f-7374-0000-70726f760001"
TO_DEVICE = "6f75742d-706f-7374-0000-70726f760002"
FROM_DEVICE = "6f75742d-706f-7374-0000-70726f760003"
PROPS = "org.freedesktop.DBus.Properties"
OM = "org.freedesktop.DBus.ObjectManager"


def say(**kw):
    print(json.dumps(kw), flush=True)


# ---- Ed25519 arithmetic and SPAKE2 as docs/provisioning.md gives them ------------------------
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def add(a, b):
    (x1, y1, z1, t1), (x2, y2, z2, t2) = a, b
    A = (y1 - x1) * (y2 - x2) % P
    B_ = (y1 + x1) * (y2 + x2) % P
    C = t1 * 2 * D * t2 % P
    D_ = z1 * 2 * z2 % P
    E, F, G, H = B_ - A, D_ - C, D_ + C, B_ + A
    return (E * F % P, G * H % P, F * G % P, E * H % P)


def mul(s, pt):
    q = (0, 1, 1, 0)
    while s:
        if s & 1:
            q = add(q, pt)
        pt = add(pt, pt)
        s >>= 1
    return q


def neg(pt):
    x, y, z, t = pt
    return (-x % P, y, z, -t % P)


def compress(pt):
    x, y, z, _ = pt
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def decompress(b):
    y = int.from_bytes(b, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    if x & 1 != sign:
        x = P - x
    return (x, y, 1, x * y % P)


BASE = decompress((4 * pow(5, P - 2, P) % P).to_bytes(32, "little"))
M = decompress(bytes.fromhex("15cfd18e385952982b6a8f8c7854963b58e34388c8e6dae891db756481a02312"))
N = decompress(bytes.fromhex("f04f2e7eb734b2a8f8b472eaf9c3c632576ac64aea650b496a8a20ff00e583c3"))


def hkdf(salt, ikm, info, n):
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + t, i + 1
    return out[:n]


def sha(b):
    return hashlib.sha256(b).digest()


def mac(k, m):
    return hmac.new(k, m, hashlib.sha256).digest()


def normalise(code):
    return "".join(c for c in code if c not in " -").upper()


class Device:
    """The device side of the protocol, fed whole messages."""

    def __init__(self, code, hw, send, mode):
        self.pw = normalise(code).encode()
        self.hw = hw.encode()
        self.send_msg = send
        self.mode = mode
        self.state = "hello"

    def handle(self, m):
        kind, seq, body = m[0], m[1], m[2:]
        say(got=kind, seq=seq)
        if kind == 0x7F:
            say(error=body[0], text=body[1:].decode(errors="replace"))
            self.state = "over"
        elif self.state == "hello" and kind == 0x01 and seq == 0:
            assert body[0] == 2, "version"
            self.gid = body[2 : 2 + body[1]]
            w = int.from_bytes(hkdf(b"", self.pw, b"SPAKE2 pw", 48), "big") % L
            self.w = w
            self.y = int.from_bytes(os.urandom(64), "little") % L
            self.msg_b = b"B" + compress(add(mul(self.y, BASE), mul(w, N)))
            self.send(0x02, 0, bytes([2, len(self.hw)]) + self.hw + self.msg_b)
            self.state = "pake"
        elif self.state == "pake" and kind == 0x03 and seq == 1:
            msg_a, confirm = body[:33], body[33:]
            x_pt = decompress(msg_a[1:])
            k = mul(self.y, add(x_pt, neg(mul(self.w, M))))
            key = sha(sha(self.pw) + sha(self.gid) + sha(self.hw) + msg_a[1:] + self.msg_b[1:] + compress(k))
            self.t = (b"outpost-provision v2" + bytes([len(self.gid)]) + self.gid + bytes([len(self.hw)]) + self.hw
                      + msg_a + self.msg_b)
            okm = hkdf(None, key, self.t, 96)
            self.kg, self.kd, self.ke = okm[:32], okm[32:64], okm[64:]
            if self.mode == "drop-after-pake":
                say(dropping=True)
                self.state = "over"
                GLib.timeout_add(50, drop_connection)
                return
            if not hmac.compare_digest(confirm, mac(self.kg, b"gateway confirm")):
                say(pairing="failed")
                self.send(0x7F, 1, bytes([2]) + b"pairing failed")
                self.state = "over"
                return
            self.send(0x04, 1, mac(self.kd, b"device confirm"))
            self.state = "bundle"
        elif self.state == "bundle" and kind == 0x05 and seq == 2:
            js = AESGCM(self.ke).decrypt(body[:12], body[12:], self.t)
            b = json.loads(js)
            self.bundle = b
            key = bytes.fromhex(b["key"])
            ident = b["id"].encode()
            self.send(0x06, 2, mac(key, b"outpost-provisioned" + bytes([len(ident)]) + ident + self.t))
            self.state = "ack"
        elif self.state == "ack" and kind == 0x07 and seq == 3:
            ok = hmac.compare_digest(body, mac(self.kg, b"gateway ack"))
            say(acknowledged=ok, bundle=self.bundle)
            self.state = "over"
        else:
            say(unexpected=[kind, seq, self.state])

    def send(self, kind, seq, body):
        self.send_msg(bytes([kind, seq]) + body)


# ---- BlueZ's objects ------------------------------------------------------------------------
class Obj(dbus.service.Object):
    iface = None

    def __init__(self, bus, path, props):
        super().__init__(bus, path)
        self.path, self.props = path, props

    @dbus.service.method(PROPS, in_signature="ss", out_signature="v")
    def Get(self, iface, name):
        if iface != self.iface or name not in self.props:
            raise dbus.exceptions.DBusException("No such property " + name,
                                                name="org.freedesktop.DBus.Error.InvalidArgs")
        return self.props[name]

    @dbus.service.method(PROPS, in_signature="s", out_signature="a{sv}")
    def GetAll(self, iface):
        return self.props if iface == self.iface else {}

    @dbus.service.method(PROPS, in_signature="ssv")
    def Set(self, iface, name, value):
        self.props[name] = value
        self.PropertiesChanged(iface, {name: value}, [])

    @dbus.service.signal(PROPS, signature="sa{sv}as")
    def PropertiesChanged(self, iface, changed, invalidated):
        pass

    def change(self, **kw):
        self.props.update(kw)
        self.PropertiesChanged(self.iface, kw, [])


def failed(text, name="org.bluez.Error.Failed"):
    return dbus.exceptions.DBusException(text, name=name)


class Root(dbus.service.Object):
    def __init__(self, bus):
        super().__init__(bus, "/")
        self.objects = {}

    @dbus.service.method(OM, out_signature="a{oa{sa{sv}}}")
    def GetManagedObjects(self):
        return {o.path: {o.iface: o.props} for o in self.objects.values()}

    @dbus.service.signal(OM, signature="oa{sa{sv}}")
    def InterfacesAdded(self, path, interfaces):
        pass

    @dbus.service.signal(OM, signature="oas")
    def InterfacesRemoved(self, path, interfaces):
        pass

    def publish(self, o):
        self.objects[o.path] = o
        self.InterfacesAdded(o.path, {o.iface: o.props})

    def withdraw(self, o):
        if self.objects.pop(o.path, None):
            self.InterfacesRemoved(o.path, [o.iface])
            o.remove_from_connection()


class Adapter(Obj):
    iface = "org.bluez.Adapter1"

    @dbus.service.method("org.bluez.Adapter1", in_signature="a{sv}")
    def SetDiscoveryFilter(self, f):
        say(discovery_filter={k: (list(map(str, v)) if k == "UUIDs" else str(v)) for k, v in f.items()})
        self.filter = f

    @dbus.service.method("org.bluez.Adapter1")
    def StartDiscovery(self):
        if not self.props["Powered"]:
            raise failed("Resource Not Ready", "org.bluez.Error.NotReady")
        if self.props["Discovering"]:
            raise failed("Operation already in progress", "org.bluez.Error.InProgress")
        self.change(Discovering=dbus.Boolean(True))
        GLib.timeout_add(200, lambda: root.publish(device) and False)

    @dbus.service.method("org.bluez.Adapter1")
    def StopDiscovery(self):
        if not self.props["Discovering"]:
            raise failed("No discovery started", "org.bluez.Error.Failed")
        self.change(Discovering=dbus.Boolean(False))


class Device1(Obj):
    iface = "org.bluez.Device1"

    @dbus.service.method("org.bluez.Device1", async_callbacks=("ok", "err"))
    def Connect(self, ok, err):
        say(connect=True)
        if self.props["Connected"]:
            return ok()

        def up():
            self.change(Connected=dbus.Boolean(True))
            ok()
            # BlueZ resolves the services after the connection, then says so.
            root.publish(service)
            root.publish(to_dev)
            root.publish(from_dev)
            self.change(ServicesResolved=dbus.Boolean(True))
            global peer
            peer = Device(CODE, HW, notify, MODE)
            return False

        GLib.timeout_add(100, up)

    @dbus.service.method("org.bluez.Device1")
    def Disconnect(self):
        say(disconnect="by the gateway")
        drop_connection()


class Service(Obj):
    iface = "org.bluez.GattService1"


class Char(Obj):
    iface = "org.bluez.GattCharacteristic1"

    @dbus.service.method("org.bluez.GattCharacteristic1", in_signature="aya{sv}")
    def WriteValue(self, value, options):
        if not device.props["Connected"]:
            raise failed("Not connected")
        if "write" not in self.props["Flags"]:
            raise failed("Write not permitted", "org.bluez.Error.NotPermitted")
        if len(value) > 20:
            raise failed("Invalid Length", "org.bluez.Error.InvalidValueLength")
        say(write=len(value), type=str(options.get("type", "")))
        reassemble(bytes(value))

    @dbus.service.method("org.bluez.GattCharacteristic1", in_signature="a{sv}", out_signature="ay")
    def ReadValue(self, options):
        raise failed("Read not permitted", "org.bluez.Error.NotPermitted")

    @dbus.service.method("org.bluez.GattCharacteristic1")
    def StartNotify(self):
        if not device.props["Connected"]:
            raise failed("Not connected")
        if "notify" not in self.props["Flags"]:
            raise failed("Operation is not supported", "org.bluez.Error.NotSupported")
        if self.props["Notifying"]:
            raise failed("Already notifying", "org.bluez.Error.InProgress")
        say(notify=True)
        self.change(Notifying=dbus.Boolean(True))

    @dbus.service.method("org.bluez.GattCharacteristic1")
    def StopNotify(self):
        if not self.props["Notifying"]:
            raise failed("No notify session started")
        self.change(Notifying=dbus.Boolean(False))


buf = b""


def reassemble(piece):
    global buf
    buf += piece
    while len(buf) >= 2:
        (n,) = struct.unpack(">H", buf[:2])
        if len(buf) < 2 + n:
            return
        m, buf = buf[2 : 2 + n], buf[2 + n :]
        if peer is not None:
            peer.handle(m)


def notify(msg):
    framed = struct.pack(">H", len(msg)) + msg
    for i in range(0, len(framed), 20):
        if not from_dev.props["Notifying"] or not device.props["Connected"]:
            say(notify_dropped=True)
            return
        from_dev.change(Value=dbus.Array(framed[i : i + 20], signature="y"))


def drop_connection():
    global peer
    peer = None
    if device.props["Connected"]:
        from_dev.props["Notifying"] = dbus.Boolean(False)
        for o in (from_dev, to_dev, service):
            root.withdraw(o)
        device.change(Connected=dbus.Boolean(False), ServicesResolved=dbus.Boolean(False))
        say(disconnected=True)
    return False


if __name__ == "__main__":
    ADDRESS, CODE, HW, MODE = sys.argv[1:5]
    DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(ADDRESS)
    name = dbus.service.BusName("org.bluez", bus)
    peer = None
    root = Root(bus)
    hci = "/org/bluez/hci0"
    dev = hci + "/dev_C0_FF_EE_00_00_01"
    adapter = Adapter(bus, hci, {
        "Address": "00:1A:7D:DA:71:13", "AddressType": "public", "Name": "outpost-test",
        "Alias": "outpost-test", "Powered": dbus.Boolean(False), "Discovering": dbus.Boolean(False),
        "Modalias": "usb:v1D6Bp0246d0540", "UUIDs": dbus.Array([], signature="s"),
    })
    device = Device1(bus, dev, {
        "Address": "C0:FF:EE:00:00:01", "AddressType": "random", "Name": "outpost-dev-" + HW,
        "Alias": "outpost-dev-" + HW, "Paired": dbus.Boolean(False), "Connected": dbus.Boolean(False),
        "ServicesResolved": dbus.Boolean(False), "Trusted": dbus.Boolean(False),
        "Blocked": dbus.Boolean(False), "LegacyPairing": dbus.Boolean(False),
        "UUIDs": dbus.Array([SERVICE], signature="s"), "RSSI": dbus.Int16(-52),
        "Adapter": dbus.ObjectPath(hci),
    })
    service = Service(bus, dev + "/service000a", {
        "UUID": SERVICE, "Primary": dbus.Boolean(True), "Device": dbus.ObjectPath(dev),
    })
    to_dev = Char(bus, dev + "/service000a/char000b", {
        "UUID": TO_DEVICE, "Service": dbus.ObjectPath(service.path),
        "Flags": dbus.Array(["write"], signature="s"), "Notifying": dbus.Boolean(False),
        "Value": dbus.Array([], signature="y"),
    })
    from_dev = Char(bus, dev + "/service000a/char000d", {
        "UUID": FROM_DEVICE, "Service": dbus.ObjectPath(service.path),
        "Flags": dbus.Array(["notify"], signature="s"), "Notifying": dbus.Boolean(False),
        "Value": dbus.Array([], signature="y"),
    })
    # GATT objects exist only while connected, as in BlueZ: unexport them until then.
    for o in (service, to_dev, from_dev):
        o.remove_from_connection()
    device.remove_from_connection()
    if MODE != "no-adapter":
        root.objects[hci] = adapter
    else:
        adapter.remove_from_connection()
    _publish = root.publish

    def publish(o):
        o.add_to_connection(bus, o.path)
        _publish(o)
        return False

    root.publish = publish
    say(ready=True)
    GLib.MainLoop().run()
