"""Will Delay Interval (5.0 3.1.3.2.2): the will is published after the delay, and not at all
when the client reconnects within it."""
from pahotest import *

a = args()
watch = Client(a.port, "wd-watch")
watch.subscribe("wd/#", qos=1)
KEEP = props(PacketTypes.CONNECT, SessionExpiryInterval=120)


def will(topic):
    return dict(topic=topic, payload=b"gone", qos=1, retain=False,
                properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=2))


c = Client(a.port, "wd-late", connect_props=KEEP, will=will("wd/late"))
c.vanish()
t0 = time.time()
m = watch.wait_for(lambda m: m.topic == "wd/late", within=6)
dt = time.time() - t0
check(m is not None, "the delayed will was published")
check(m is None or 1.7 <= dt <= 4.0, f"after about its 2 s delay (after {dt:.1f} s)")

c = Client(a.port, "wd-back", connect_props=KEEP, will=will("wd/back"))
c.vanish()
time.sleep(0.5)
back = Client(a.port, "wd-back", clean_start=False, connect_props=KEEP)
check(back.session_present, "reconnected to the same session")
m = watch.wait_for(lambda m: m.topic == "wd/back", within=3.5)
check(m is None, f"reconnecting within the delay cancels the will ({describe(m)})")

# Session expiry shorter than the will delay: the will goes when the session ends (at once
# for expiry 0).
c = Client(a.port, "wd-short", connect_props=props(PacketTypes.CONNECT, SessionExpiryInterval=0),
           will=dict(topic="wd/short", payload=b"gone", qos=1, retain=False,
                     properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=30)))
c.vanish()
t0 = time.time()
m = watch.wait_for(lambda m: m.topic == "wd/short", within=4)
check(m is not None and time.time() - t0 < 2.5, "session ending first publishes the will then")
done()
