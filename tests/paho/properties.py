"""Every MQTT 5 application message property arrives untouched: live, retained, and as a will."""
from pahotest import *

a = args()
USER = [("origin", "sensor-7"), ("unit", "°C"), ("origin", "again")]  # order and repeats kept
WANT = dict(UserProperty=USER, ContentType="application/json", PayloadFormatIndicator=1,
            ResponseTopic="replies/sensor-7", CorrelationData=b"\x00\x01req-42\xff")


def same(m, where):
    check(m is not None, f"{where}: message arrived ({describe(m)})")
    if m is None:
        return
    for k, v in WANT.items():
        got = prop(m, k)
        check(got == v, f"{where}: {k} = {v!r} (got {got!r})")


def make(kind):
    p = Properties(kind)
    for k, v in WANT.items():
        setattr(p, k, v)
    return p


sub = Client(a.port, "props-sub")
sub.subscribe("props/#", qos=1)
pub = Client(a.port, "props-pub")

pub.publish("props/live", b'{"t": 21.5}', qos=1, properties=make(PacketTypes.PUBLISH))
same(sub.next(), "live QoS 1")
pub.publish("props/live0", b'{"t": 21.5}', qos=0, properties=make(PacketTypes.PUBLISH))
same(sub.next(), "live QoS 0")

pub.publish("props/kept", b'{"t": 22}', qos=1, retain=True, properties=make(PacketTypes.PUBLISH))
sub.next()
late = Client(a.port, "props-late")
late.subscribe("props/kept", qos=1)
m = late.next()
check(m is not None and m.retain, "retained copy has the retain flag")
same(m, "retained")

w = Client(a.port, "props-will", will=dict(topic="props/will", payload=b"gone", qos=1, retain=False,
                                           properties=make(PacketTypes.WILLMESSAGE)))
w.vanish()
same(sub.wait_for(lambda m: m.topic == "props/will"), "will")
done()
