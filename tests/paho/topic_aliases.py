"""Topic aliases both ways (5.0 3.3.2.3.4): the client's aliases are resolved by the broker; the
broker's toward a client stay within the client's Topic Alias Maximum and resolve correctly."""
from pahotest import *

a = args()
sub = Client(a.port, "ta-sub")
sub.subscribe("ta/#", qos=1)
pub = Client(a.port, "ta-pub")
amax = getattr(pub.connack_props, "TopicAliasMaximum", 0) if pub.connack_props else 0
check(amax >= 1, f"CONNACK offers topic aliases (Topic Alias Maximum {amax})")

# Client -> server: set alias 1, use it with an empty topic, then remap it.
pub.publish("ta/first", b"1", qos=1, properties=pub_props(TopicAlias=1))
pub.publish("", b"2", qos=1, properties=pub_props(TopicAlias=1))
pub.publish("ta/second", b"3", qos=1, properties=pub_props(TopicAlias=1))
pub.publish("", b"4", qos=1, properties=pub_props(TopicAlias=1))
got = [(m.topic, m.payload) for m in sub.all()]
check(got == [("ta/first", b"1"), ("ta/first", b"2"), ("ta/second", b"3"), ("ta/second", b"4")],
      f"client aliases resolved by the broker ({got})")

# Server -> client, for a client that allows 4 aliases.
LONG = "ta/a/rather/long/topic/name/for/a/sensor/reading"
al = Client(a.port, "ta-aliased", connect_props=props(PacketTypes.CONNECT, TopicAliasMaximum=4))
al.subscribe(LONG, qos=1)
al.subscribe("ta/other/#", qos=1)
for i in range(5):
    pub.publish(LONG, f"L{i}".encode(), qos=1)
    pub.publish(f"ta/other/{i}", f"O{i}".encode(), qos=1)
aliases, resolved, used, bad = {}, [], 0, []
for m in al.all():
    alias = prop(m, "TopicAlias")
    if alias is not None:
        if not (1 <= alias <= 4):
            bad.append(alias)
        if m.topic:
            aliases[alias] = m.topic
        else:
            used += 1
        resolved.append((m.topic or aliases.get(alias, "?unknown alias?"), m.payload))
    else:
        resolved.append((m.topic, m.payload))
want = [x for i in range(5) for x in ((LONG, f"L{i}".encode()), (f"ta/other/{i}", f"O{i}".encode()))]
check(sorted(resolved) == sorted(want), f"every message resolves to its topic ({resolved})")
check(not bad, f"aliases within the client's maximum of 4 (outside: {bad})")
check(used >= 1, f"the broker used an alias toward the client ({used} messages sent by alias alone)")

# A client that allows none gets none.
none = [prop(m, "TopicAlias") for m in sub.all(0.3)]
check(all(x is None for x in none), f"no aliases toward a client without Topic Alias Maximum ({none})")
done()
