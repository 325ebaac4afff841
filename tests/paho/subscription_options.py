"""Subscription identifiers, No Local, Retain Handling 0/1/2, Retain As Published, and
overlapping subscriptions with identifiers (5.0 3.8.3.1, 3.3.4)."""
from pahotest import *
from paho.mqtt.subscribeoptions import SubscribeOptions as SO

a = args()
pub = Client(a.port, "so-pub")

# Subscription identifiers: each delivery carries the id of the subscription it matched.
s = Client(a.port, "so-ids")
s.subscribe("ids/a/#", options=SO(qos=1), properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=11))
s.subscribe("ids/+/x", options=SO(qos=1), properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=22))
s.subscribe("ids/b/#", options=SO(qos=1), properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=33))
pub.publish("ids/b/y", b"1", qos=1)
m = s.next()
check(m is not None and prop(m, "SubscriptionIdentifier") == [33], f"one match: id [33] ({describe(m)})")
pub.publish("ids/a/x", b"2", qos=1)
ms = s.all()
ids = sorted(i for m in ms for i in (prop(m, "SubscriptionIdentifier") or []))
check(len(ms) == 1, f"overlapping subscriptions: one copy ({len(ms)} arrived)")
check(ids == [11, 22], f"that copy carries both identifiers [11, 22] (got {ids})")
if ms:
    check(ms[0].qos == 1, "at the highest granted QoS")

# No Local: a client's own messages are not sent back to it.
nl = Client(a.port, "so-nolocal")
nl.subscribe("nl/t", options=SO(qos=1, noLocal=True))
nl.publish("nl/t", b"mine", qos=1)
pub.publish("nl/t", b"theirs", qos=1)
got = [m.payload for m in nl.all()]
check(got == [b"theirs"], f"No Local: only others' messages ({got})")

# Retain handling. A retained message on rh/t first.
pub.publish("rh/t", b"kept", qos=1, retain=True)
for rh, first, second in [(0, 1, 1), (1, 1, 0), (2, 0, 0)]:
    c = Client(a.port, f"so-rh{rh}")
    c.subscribe("rh/t", options=SO(qos=1, retainHandling=rh))
    n1 = len([m for m in c.all(0.6) if m.retain])
    c.subscribe("rh/t", options=SO(qos=1, retainHandling=rh))  # the same subscription again
    n2 = len([m for m in c.all(0.6) if m.retain])
    check((n1, n2) == (first, second),
          f"retain handling {rh}: retained sent on new subscription {first}, on re-subscribe {second} (got {n1}, {n2})")
    c.disconnect()

# Retain As Published: live messages keep the retain flag only with RAP set.
rap = Client(a.port, "so-rap")
rap.subscribe("rap/t", options=SO(qos=1, retainAsPublished=True, retainHandling=2))
norap = Client(a.port, "so-norap")
norap.subscribe("rap/t", options=SO(qos=1, retainAsPublished=False, retainHandling=2))
pub.publish("rap/t", b"r", qos=1, retain=True)
m1, m2 = rap.next(), norap.next()
check(m1 is not None and m1.retain, f"RAP=1: live retained message keeps retain=1 ({describe(m1)})")
check(m2 is not None and not m2.retain, f"RAP=0: live message has retain=0 ({describe(m2)})")
# A retained message sent because of a new subscription always has retain=1.
late = Client(a.port, "so-rap-late")
late.subscribe("rap/t", options=SO(qos=1, retainAsPublished=False))
m = late.next()
check(m is not None and m.retain, f"retained on subscribe has retain=1 even with RAP=0 ({describe(m)})")
done()
