"""MQTT 5 messages with properties delivered to MQTT 3.1.1 subscribers: they arrive without the
properties, and the broker keeps serving everyone (this crashed the old engine)."""
from pahotest import *

a = args()
old = Client(a.port, "v311-sub", v5=False)
old.subscribe("mix/#", qos=1)
new = Client(a.port, "v5-pub")
P = pub_props(UserProperty=[("k", "v")], ContentType="text/plain", PayloadFormatIndicator=1,
              ResponseTopic="mix/reply", CorrelationData=b"c", MessageExpiryInterval=60)
new.publish("mix/live1", b"one", qos=1, properties=P)
new.publish("mix/live0", b"zero", qos=0, properties=P)
new.publish("mix/kept", b"kept", qos=1, retain=True, properties=P)
w = Client(a.port, "v5-will", will=dict(topic="mix/will", payload=b"bye", qos=1, retain=False,
                                        properties=props(PacketTypes.WILLMESSAGE, UserProperty=[("w", "1")],
                                                         ContentType="text/plain")))
w.vanish()
got = sorted((m.topic, m.payload) for m in old.all(quiet=1.5))
check(got == [("mix/kept", b"kept"), ("mix/live0", b"zero"), ("mix/live1", b"one"), ("mix/will", b"bye")],
      f"the 3.1.1 subscriber got all four ({got})")
# A new 3.1.1 client gets the retained one, and everyone is still served.
late = Client(a.port, "v311-late", v5=False)
late.subscribe("mix/kept", qos=1)
m = late.next()
check(m is not None and m.payload == b"kept", f"retained with properties to a new 3.1.1 subscriber ({describe(m)})")
old.disconnect()
again = Client(a.port, "v311-sub", v5=False)
again.subscribe("after/#", qos=1)
other = Client(a.port, "v311-other", v5=False)
other.publish("after/x", b"fine", qos=1)
m = again.next()
check(m is not None and m.payload == b"fine", "3.1.1 clients connect and are served afterwards")
new.publish("after/y", b"v5 too", qos=1)
m = again.next()
check(m is not None and m.payload == b"v5 too", "and MQTT 5 publishers still reach them")
done()
