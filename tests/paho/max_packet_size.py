"""A client's Maximum Packet Size (5.0 3.1.2.11.4): a message too big for it is not sent to it
(and it stays connected); a small one is."""
from pahotest import *

a = args()
small = Client(a.port, "mps-small", connect_props=props(PacketTypes.CONNECT, MaximumPacketSize=256))
small.subscribe("mps/#", qos=1)
big = Client(a.port, "mps-big")
big.subscribe("mps/#", qos=1)
pub = Client(a.port, "mps-pub")
pub.publish("mps/1", b"x" * 1000, qos=1)
pub.publish("mps/2", b"tiny", qos=1)
got = [(m.topic, len(m.payload)) for m in small.all()]
check(got == [("mps/2", 4)], f"the small client got only the message that fits ({got})")
check(small.disconnected.empty(), "the small client is still connected")
got = [(m.topic, len(m.payload)) for m in big.all()]
check(got == [("mps/1", 1000), ("mps/2", 4)], f"another client got both ({got})")
# Retained too: a retained message too big for the client is not sent on subscribe.
pub.publish("mpsr/big", b"y" * 1000, qos=1, retain=True)
pub.publish("mpsr/small", b"ok", qos=1, retain=True)
small.subscribe("mpsr/#", qos=1)
got = [m.topic for m in small.all()]
check(got == ["mpsr/small"], f"retained: only what fits ({got})")
check(small.disconnected.empty(), "still connected after the retained ones")
done()
