"""CONNACK for MQTT 5: an assigned client identifier for an empty one (3.2.2.3.7), and Server
Keep Alive when the broker does not take the client's keep alive (3.2.2.3.14)."""
from pahotest import *

a = args()
c1 = Client(a.port, "", clean_start=True)
id1 = getattr(c1.connack_props, "AssignedClientIdentifier", None) if c1.connack_props else None
check(bool(id1), f"empty client id: CONNACK assigns one ({id1!r})")
c2 = Client(a.port, "", clean_start=True)
id2 = getattr(c2.connack_props, "AssignedClientIdentifier", None) if c2.connack_props else None
check(bool(id2) and id2 != id1, f"a second one gets another ({id2!r})")
# The assigned id works: the client can subscribe and receive.
c1.subscribe("ack/t", qos=1)
c2.publish("ack/t", b"hi", qos=1)
m = c1.next()
check(m is not None and m.payload == b"hi", "a client with an assigned id is served")

k = Client(a.port, "ka-long", keepalive=7200)
ska = getattr(k.connack_props, "ServerKeepAlive", None) if k.connack_props else None
check(ska is not None and 0 < ska < 7200, f"keep alive 7200 s asked: Server Keep Alive given ({ska!r})")
n = Client(a.port, "ka-normal", keepalive=30)
ska = getattr(n.connack_props, "ServerKeepAlive", None) if n.connack_props else None
check(ska in (None, 30), f"keep alive 30 s: kept as asked ({ska!r})")
done()
