"""Message Expiry Interval in an offline queue: an expired message is not delivered, a live one
is delivered with the interval lowered by the time it waited (5.0 3.3.2.3.3)."""
from pahotest import *

a = args()
KEEP = props(PacketTypes.CONNECT, SessionExpiryInterval=300)
s = Client(a.port, "exp-sub", clean_start=True, connect_props=KEEP)
s.subscribe("exp/#", qos=1)
s.disconnect()

p = Client(a.port, "exp-pub")
p.publish("exp/short", b"short-lived", qos=1, properties=pub_props(MessageExpiryInterval=2))
p.publish("exp/long", b"long-lived", qos=1, properties=pub_props(MessageExpiryInterval=10))
p.publish("exp/none", b"no expiry", qos=1)
time.sleep(3.2)  # the subscriber is away for 3 s: this wait is the scenario, not a sync

s = Client(a.port, "exp-sub", clean_start=False, connect_props=KEEP)
check(s.session_present, "session present on return")
got = {m.topic: m for m in s.all(quiet=1.0)}
check("exp/short" not in got, f"expired message (2 s, waited 3 s) not delivered ({describe(got.get('exp/short'))})")
m = got.get("exp/long")
check(m is not None, "unexpired message (10 s) delivered")
left = prop(m, "MessageExpiryInterval") if m else None
check(left is not None and 0 < left <= 8, f"its expiry interval is what is left, 10 minus ~3 s (got {left!r})")
m = got.get("exp/none")
check(m is not None and prop(m, "MessageExpiryInterval") is None, "message without expiry delivered without one")

# Retained: an expired retained message is no longer given to new subscribers.
p.publish("exp/ret", b"soon stale", qos=1, retain=True, properties=pub_props(MessageExpiryInterval=1))
time.sleep(2.2)
n = Client(a.port, "exp-new")
n.subscribe("exp/ret", qos=1)
m = n.next(1.0)
check(m is None, f"expired retained message not delivered ({describe(m)})")
done()
