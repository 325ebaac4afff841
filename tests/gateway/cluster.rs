//! Bridges against real clustered upstreams that the tests start themselves (see `peers.rs`):
//! a 3-node RabbitMQ 3.10 cluster (rabbitmq_mqtt: MQTT 3.1.1) and a 2-node ejabberd 23.01 cluster
//! (mod_mqtt: MQTT 5). A bridge with `urls:` for every node keeps sending while `kill -9` hits the
//! node it is connected to; what a user checks is what a subscriber on a surviving node gets.
//!
//! Only with `--features cluster` (`bash .ci/test --cluster`). Without the Debian packages
//! these tests fail and say what to install; they never pass without the peers.

mod peers;

use crate::bridge::{check_numbered, wait_state};
use crate::common::*;
use peers::{EjabberdCluster, RabbitCluster, BRIDGE_USER, SUB_USER};
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);
/// Messages per run and the publisher's pace: 1500 over ~7.5 s, the kill 2 s in.
const N: usize = 1500;
const PACE: Duration = Duration::from_millis(5);
const KILL_AFTER: Duration = Duration::from_secs(2);
/// Numbered messages go to three topics, `data/n/{a,b,c}` locally, `up/n/{a,b,c}` upstream.
const TOPICS: [&str; 3] = ["a", "b", "c"];

/// The gateway's config: a loopback listener and one bridge `cloud` over every node's address.
fn cluster_bridge(port: u16, urls: &[String], extra: &str) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let mut s = format!(
        "{}bridges:\n  - name: cloud\n    urls: [{}]\n    backoff: {{ min: 200ms, max: 1s }}\n    \
         auth: {{ username: {}, password: {} }}\n    rules:\n      \
         - {{ direction: out, local: \"data/#\", remote: \"up/{{#}}\", qos: 1 }}\n",
        open_broker(port),
        list.join(", "),
        BRIDGE_USER.0,
        BRIDGE_USER.1
    );
    for line in extra.lines() {
        s.push_str(&format!("    {line}\n"));
    }
    s
}

/// The user properties (and content type) each numbered message carries when asked to: its
/// number, the site, and non-ASCII text, so a broker that mangles or drops them is seen.
fn props_for(n: usize) -> PublishProperties {
    PublishProperties {
        user_properties: vec![
            ("seq".into(), n.to_string()),
            ("site".into(), "test-gw".into()),
            ("unit".into(), "°C/größe ✓".into()),
        ],
        content_type: Some("text/plain; charset=utf-8".into()),
        ..Default::default()
    }
}

/// A local MQTT 5 publisher sending `n` numbered QoS 1 messages, one per `every`, round the
/// three topics. `published` is how many it has started to publish: a message numbered at or
/// above its value read after a kill entered the gateway after that kill.
struct Paced {
    published: Arc<AtomicUsize>,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

fn publish_paced(port: u16, n: usize, every: Duration, with_props: bool) -> Paced {
    let published = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let (p, a) = (published.clone(), acked.clone());
    let task = tokio::spawn(async move {
        let mut o = v5::MqttOptions::new("paced", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (c, mut ev) = v5::AsyncClient::new(o, 200);
        let driver = tokio::spawn(async move {
            while let Ok(e) = ev.poll().await {
                if let v5::Event::Incoming(P5::PubAck(_)) = e {
                    a.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..n {
            tick.tick().await;
            p.store(i + 1, Ordering::SeqCst);
            let topic = format!("data/n/{}", TOPICS[i % TOPICS.len()]);
            let qos = v5::mqttbytes::QoS::AtLeastOnce;
            let r = if with_props {
                c.publish_with_properties(topic, qos, false, i.to_string(), props_for(i))
                    .await
            } else {
                c.publish(topic, qos, false, i.to_string()).await
            };
            r.expect("local publish");
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), driver).await;
    });
    Paced { published, acked, task }
}

impl Paced {
    /// Waits until every message was acknowledged by the gateway (or 30 s); returns how many.
    async fn done(self, n: usize) -> usize {
        let end = Instant::now() + Duration::from_secs(30);
        while self.acked.load(Ordering::SeqCst) < n && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.task.abort();
        self.acked.load(Ordering::SeqCst)
    }
}

/// The bridge's local state topic, each message with when it came.
type States = Arc<Mutex<Vec<(Instant, serde_json::Value)>>>;

async fn watch_states(port: u16) -> (States, tokio::task::JoinHandle<()>) {
    let (c, mut ev) = connect(opts(port, "state-watch")).await.unwrap();
    subscribe(
        &c,
        &mut ev,
        "outpost/test-gw/bridges/cloud/state",
        rumqttc::QoS::AtMostOnce,
    )
    .await;
    let states: States = Default::default();
    let s = states.clone();
    let task = tokio::spawn(async move {
        let _c = c;
        while let Ok(e) = ev.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = e {
                if let Ok(v) = serde_json::from_slice(&p.payload) {
                    s.lock().unwrap().push((Instant::now(), v));
                }
            }
        }
    });
    (states, task)
}

/// One message at an upstream subscriber.
#[derive(Clone)]
struct Got {
    at: Instant,
    topic: String,
    payload: Vec<u8>,
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
}

type Gots = Arc<Mutex<Vec<Got>>>;

/// An upstream subscriber to `up/#` at QoS 1 that keeps every message with its properties and
/// arrival time; MQTT 5 or 3.1.1, clean session (its queue is on the node it connects to),
/// resubscribing after a reconnect.
struct Watcher {
    got: Gots,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(port: u16, v5_client: bool) -> Watcher {
        let got: Gots = Default::default();
        let g = got.clone();
        let task = if v5_client {
            tokio::spawn(async move {
                let mut o = v5::MqttOptions::new("up-watch", "127.0.0.1", port);
                o.set_keep_alive(Duration::from_secs(30));
                o.set_credentials(SUB_USER.0, SUB_USER.1);
                let (c, mut ev) = v5::AsyncClient::new(o, 100);
                loop {
                    match ev.poll().await {
                        Ok(v5::Event::Incoming(P5::ConnAck(_))) => {
                            let _ = c.try_subscribe("up/#", v5::mqttbytes::QoS::AtLeastOnce);
                        }
                        Ok(v5::Event::Incoming(P5::Publish(p))) => {
                            let props = p.properties.clone().unwrap_or_default();
                            g.lock().unwrap().push(Got {
                                at: Instant::now(),
                                topic: String::from_utf8_lossy(&p.topic).to_string(),
                                payload: p.payload.to_vec(),
                                user_properties: props.user_properties,
                                content_type: props.content_type,
                            });
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        } else {
            tokio::spawn(async move {
                let mut o = opts(port, "up-watch");
                o.set_credentials(SUB_USER.0, SUB_USER.1);
                let (c, mut ev) = rumqttc::AsyncClient::new(o, 100);
                loop {
                    match ev.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            let _ = c.try_subscribe("up/#", rumqttc::QoS::AtLeastOnce);
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => g.lock().unwrap().push(Got {
                            at: Instant::now(),
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            user_properties: vec![],
                            content_type: None,
                        }),
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        Watcher { got, task }
    }

    /// The numbered messages so far, as (topic, payload).
    fn numbered(&self) -> Vec<(String, Vec<u8>)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.topic.starts_with("up/n/"))
            .map(|g| (g.topic.clone(), g.payload.clone()))
            .collect()
    }

    fn distinct(&self) -> usize {
        let mut v: Vec<Vec<u8>> = self.numbered().into_iter().map(|(_, p)| p).collect();
        v.sort();
        v.dedup();
        v.len()
    }

    /// When the first numbered message at or above `k` arrived, waiting up to `within`.
    async fn first_at_least(&self, k: usize, within: Duration) -> Option<(Instant, usize)> {
        let end = Instant::now() + within;
        loop {
            let hit = self.got.lock().unwrap().iter().find_map(|g| {
                let n: usize = std::str::from_utf8(&g.payload).ok()?.parse().ok()?;
                (g.topic.starts_with("up/n/") && n >= k).then_some((g.at, n))
            });
            if hit.is_some() || Instant::now() > end {
                return hit;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes `data/warm` locally until the upstream subscriber has it: the bridge is connected,
/// the subscription exists upstream and routes across the cluster. (The brokers drop a message
/// no subscription matches, acknowledging it all the same.)
async fn warm_up(port: u16, w: &Watcher) {
    let (c, ev) = connect(opts(port, "warm")).await.unwrap();
    let _d = drive(ev);
    let end = Instant::now() + Duration::from_secs(30);
    while !w.got.lock().unwrap().iter().any(|g| g.topic == "up/warm") {
        assert!(
            Instant::now() < end,
            "nothing published locally reached the upstream subscriber in 30 s"
        );
        c.publish("data/warm", rumqttc::QoS::AtLeastOnce, false, "warm")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What one failover run saw.
struct Run {
    /// kill -9 → the bridge's local state says connected again, and where.
    reconnected: Duration,
    url: String,
    /// kill -9 → the first message published after the kill at the subscriber.
    first_after: Duration,
    duplicates: usize,
}

/// The common part: the bridge connected to node `on` of `urls`, a subscriber (`w`) on another
/// node; publishes, kills `on` after `KILL_AFTER` with `kill`, checks everything arrived.
async fn failover_run(
    gw: &Gateway,
    port: u16,
    urls: &[String],
    on: usize,
    w: &Watcher,
    with_props: bool,
    kill: impl FnOnce() -> Instant,
) -> Run {
    let (states, st_task) = watch_states(port).await;
    let publisher = publish_paced(port, N, PACE, with_props);
    tokio::time::sleep(KILL_AFTER).await;
    let before = w.numbered().len();
    assert!(
        before > 0,
        "nothing reached the subscriber through {} before the kill",
        urls[on]
    );
    let killed = tokio::task::block_in_place(kill);
    // Read after the kill: messages from here on cannot have reached the killed node.
    let k = publisher.published.load(Ordering::SeqCst);
    assert!(k < N, "the publisher finished before the kill");
    let (at, first) = w
        .first_at_least(k, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no message published after the kill (#{k} on) arrived in 60 s"));
    let first_after = at.duration_since(killed);
    assert_eq!(publisher.done(N).await, N, "the gateway must take every message");

    let end = Instant::now() + Duration::from_secs(60);
    while w.distinct() < N {
        assert!(
            Instant::now() < end,
            "{} of {N} messages arrived at the subscriber in 60 s",
            w.distinct()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let duplicates = check_numbered(&w.numbered(), 0..N);

    let (reconnected, url) = states
        .lock()
        .unwrap()
        .iter()
        .find(|(t, s)| *t > killed && s["connected"] == true)
        .map(|(t, s)| {
            (
                t.duration_since(killed),
                s["url"].as_str().unwrap_or_default().to_string(),
            )
        })
        .expect("the bridge's state never said connected after the kill");
    st_task.abort();
    assert!(
        url != urls[on] && urls.contains(&url),
        "reconnected to {url}, not another of {urls:?}"
    );
    wait_state(gw, "cloud", T, "bridge connected elsewhere, spool empty", |s| {
        s["connected"] == true && s["queued"] == 0 && s["url"] == url.as_str()
    })
    .await;
    let s = gw.bridge_state("cloud");
    assert_eq!(s["failovers"], 1, "{s}");
    eprintln!(
        "  kill -9 → bridge connected to {url}: {} ms; → first message published after the kill \
         (#{first}) at the subscriber: {} ms; {N} delivered, {duplicates} duplicates, {before} \
         had arrived before the kill",
        reconnected.as_millis(),
        first_after.as_millis()
    );
    Run {
        reconnected,
        url,
        first_after,
        duplicates,
    }
}

/// A bridge over the three nodes of a RabbitMQ 3.10 cluster keeps sending through `kill -9` of
/// the node it is connected to: every QoS 1 message arrives at a subscriber on another node,
/// per-topic order of first arrivals kept, duplicates counted.
///
/// RabbitMQ acknowledges a publish that no queue takes and drops it, so the bridge cannot see a
/// loss; only the subscriber can. The subscriber has a clean session, so its queue lives on the
/// node it connected to: that node is one the test does not kill (the last node the bridge is
/// not on). Failover time here is "node killed → first message that entered the gateway after
/// the kill arrives at the subscriber": such a message can only have been accepted by another
/// node, so it bounds "first message accepted by another node" from above (by the 5 ms publisher
/// pace and the local path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_cluster_bridge_keeps_sending_through_kill_9_of_its_node() {
    let started = Instant::now();
    let mut rmq = tokio::task::block_in_place(|| RabbitCluster::start(3));
    eprintln!("RabbitMQ: 3 nodes running in {} s", started.elapsed().as_secs());
    let urls: Vec<String> = (0..3).map(|i| rmq.url(i)).collect();
    let port = free_port();
    let gw = Gateway::start(&cluster_bridge(port, &urls, ""));
    wait_state(&gw, "cloud", T, "bridge connected to a node", |s| {
        s["connected"] == true && s["url"].is_string()
    })
    .await;
    let on = rmq.index_of(gw.bridge_state("cloud")["url"].as_str().unwrap());
    let sub_node = (0..3).rev().find(|&i| i != on).unwrap();
    let w = Watcher::start(rmq.nodes[sub_node].mqtt_port, false);
    warm_up(port, &w).await;

    let killed_name = rmq.nodes[on].name.clone();
    let run = failover_run(&gw, port, &urls, on, &w, false, || rmq.nodes[on].kill9()).await;
    assert!(!rmq.nodes[on].running(), "the killed node's process is still there");
    // RabbitMQ's own view: the killed node is gone from the running nodes.
    let running = tokio::task::block_in_place(|| rmq.running_nodes(sub_node));
    assert!(
        running.len() == 2 && !running.contains(&killed_name),
        "cluster_status after the kill: {running:?}"
    );
    eprintln!(
        "RabbitMQ failover: killed {killed_name}, subscriber on node {}, bridge now on {}: \
         reconnected {} ms, first new message {} ms, {} duplicates; whole test {} s",
        sub_node + 1,
        run.url,
        run.reconnected.as_millis(),
        run.first_after.as_millis(),
        run.duplicates,
        started.elapsed().as_secs()
    );
}

/// A client of our own publishes straight to ejabberd node `on` with user properties and a
/// content type; the subscriber on the other node must get them intact. This is the cluster
/// doing its part, with no outpost in between.
async fn direct_properties_cross_nodes(port: u16, w: &Watcher) {
    let mut o = v5::MqttOptions::new("direct", "127.0.0.1", port);
    o.set_credentials(BRIDGE_USER.0, BRIDGE_USER.1);
    let (c, mut ev) = v5::AsyncClient::new(o, 10);
    let d = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    c.publish_with_properties(
        "up/direct",
        v5::mqttbytes::QoS::AtLeastOnce,
        false,
        "direct",
        props_for(7),
    )
    .await
    .unwrap();
    let end = Instant::now() + T;
    let got = loop {
        if let Some(g) = w.got.lock().unwrap().iter().find(|g| g.topic == "up/direct") {
            break g.clone();
        }
        assert!(
            Instant::now() < end,
            "a direct MQTT 5 publish did not cross the cluster"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    d.abort();
    let want = props_for(7);
    assert_eq!(
        (got.user_properties, got.content_type),
        (want.user_properties, want.content_type),
        "ejabberd itself lost properties between its nodes"
    );
}

/// An MQTT 5 bridge (`protocol: 5`) over both nodes of an ejabberd 23.01 cluster: `kill -9` of
/// the node it is connected to mid-stream; every message arrives at a subscriber on the other
/// node, per-topic order of first arrivals kept, duplicates counted. With `with_props`, every
/// local publish carries user properties and a content type, and every arrival must carry them
/// unchanged.
///
/// ejabberd 23.01 as found here: MQTT 5 and user properties cross its nodes (checked first, with
/// a client of our own); it refuses shared subscriptions (DISCONNECT 0x9E) and keeps retained
/// messages per node, neither of which these tests use.
async fn ejabberd_failover(with_props: bool) {
    let started = Instant::now();
    let mut ej = tokio::task::block_in_place(|| EjabberdCluster::start(2));
    eprintln!("ejabberd: 2 nodes clustered in {} s", started.elapsed().as_secs());
    let urls: Vec<String> = (0..2).map(|i| ej.url(i)).collect();
    let port = free_port();
    let gw = Gateway::start(&cluster_bridge(port, &urls, "protocol: 5"));
    wait_state(&gw, "cloud", T, "bridge connected to a node", |s| {
        s["connected"] == true && s["url"].is_string()
    })
    .await;
    let on = ej.index_of(gw.bridge_state("cloud")["url"].as_str().unwrap());
    let sub_node = 1 - on;
    let w = Watcher::start(ej.nodes[sub_node].mqtt_port, true);
    warm_up(port, &w).await;
    direct_properties_cross_nodes(ej.nodes[on].mqtt_port, &w).await;

    let killed_name = ej.nodes[on].name.clone();
    let run = failover_run(&gw, port, &urls, on, &w, with_props, || ej.nodes[on].kill9()).await;
    if with_props {
        let got = w.got.lock().unwrap().clone();
        for g in got.iter().filter(|g| g.topic.starts_with("up/n/")) {
            let n: usize = String::from_utf8_lossy(&g.payload).parse().unwrap();
            let want = props_for(n);
            assert_eq!(
                (&g.user_properties, &g.content_type),
                (&want.user_properties, &want.content_type),
                "message #{n} on {} lost its properties over the bridge",
                g.topic
            );
        }
    }
    assert!(!ej.nodes[on].running(), "the killed node's process is still there");
    let listed = tokio::task::block_in_place(|| ej.cluster_nodes(sub_node));
    assert!(
        !listed.contains(&killed_name),
        "list_cluster after the kill still lists {killed_name}: {listed:?}"
    );
    eprintln!(
        "ejabberd failover (MQTT 5{}): killed {killed_name}, bridge now on {}: reconnected {} ms, \
         first new message {} ms, {} duplicates; whole test {} s",
        if with_props { ", user properties" } else { "" },
        run.url,
        run.reconnected.as_millis(),
        run.first_after.as_millis(),
        run.duplicates,
        started.elapsed().as_secs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_mqtt5_cluster_bridge_keeps_sending_through_kill_9_of_its_node() {
    ejabberd_failover(false).await;
}

/// The ejabberd case in full: as above, with user properties (and a content type) on
/// every message, which must arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_mqtt5_cluster_bridge_keeps_user_properties_through_kill_9() {
    ejabberd_failover(true).await;
}
