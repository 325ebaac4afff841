//! MQTT topic names and filters: validity, matching, and whether one filter lies inside another
//! (for subscribe ACLs). `$`-topics follow the spec: a wildcard in the first level never
//! matches them, a literal `$SYS` does.
//!
//! A leaf: it imports nothing of the crate, so the config can check topics with the same
//! grammar the broker routes by without depending on the broker.

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0']) && levels(topic) <= MAX_LEVELS
}

/// The most levels a topic name or filter may have (as Mosquitto's limit): deeper ones are
/// refused, so no client makes the index or the matcher walk thousands of levels.
pub const MAX_LEVELS: usize = 200;

fn levels(s: &str) -> usize {
    s.bytes().filter(|b| *b == b'/').count() + 1
}

/// A topic filter: `+` fills a whole level, `#` only the last whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') || levels(filter) > MAX_LEVELS {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Splits `$share/group/filter` into the filter; other filters are returned as they are.
pub fn strip_share(filter: &str) -> Option<&str> {
    match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (group, f) = rest.split_once('/')?;
            (!group.is_empty() && !group.contains(['+', '#'])).then_some(f)
        }
        None => Some(filter),
    }
}

/// Does `filter` match `topic`?
pub fn matches(topic: &str, filter: &str) -> bool {
    let mut t = topic.split('/');
    let mut first = true;
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", Some(level)) => return !(first && level.starts_with('$')),
            ("#", None) => return true,
            ("+", Some(level)) if !(first && level.starts_with('$')) => {}
            (f, Some(level)) if f == level => {}
            _ => return false,
        }
        first = false;
    }
    t.next().is_none()
}

/// Does every topic that `inner` matches also match `outer`? Used to decide whether an ACL
/// filter allows a subscription.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut i = inner.split('/');
    let mut first = true;
    for o in outer.split('/') {
        let level = i.next();
        match (o, level) {
            ("#", Some(l)) => return !(first && l.starts_with('$')),
            ("#", None) => return true,
            // `+` covers any single level, `+` itself, but not `#` (which spans many).
            ("+", Some("#")) => return false,
            ("+", Some(l)) if !(first && l.starts_with('$')) => {}
            (o, Some(l)) if o == l && l != "+" && l != "#" => {}
            _ => return false,
        }
        first = false;
    }
    i.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topics_and_filters_deeper_than_the_limit_are_refused() {
        let deep = |n: usize| vec!["a"; n].join("/");
        assert!(valid_topic(&deep(MAX_LEVELS)));
        assert!(!valid_topic(&deep(MAX_LEVELS + 1)));
        assert!(!valid_topic(&deep(10_000)));
        assert!(valid_filter(&(deep(MAX_LEVELS - 1) + "/#")));
        assert!(!valid_filter(&(deep(MAX_LEVELS) + "/#")));
    }

    #[test]
    fn filters_and_topics() {
        assert!(valid_filter("a/+/c/#") && valid_filter("#") && valid_filter("+"));
        assert!(!valid_filter("a/#/b") && !valid_filter("a+") && !valid_filter(""));
        assert!(valid_topic("a/b") && !valid_topic("a/+") && !valid_topic(""));
        assert!(matches("a/b/c", "a/+/c") && matches("a/b/c", "a/#") && matches("a", "a/#"));
        assert!(!matches("$SYS/x", "#") && !matches("$SYS/x", "+/x") && matches("$SYS/x", "$SYS/#"));
        assert_eq!(strip_share("$share/g/a/b"), Some("a/b"));
        assert_eq!(strip_share("$share/g"), None);
    }

    #[test]
    fn coverage_is_about_sets_of_topics() {
        assert!(covers("#", "a/b/#"));
        assert!(covers("devices/x/#", "devices/x/cmd/+"));
        assert!(covers("a/+/c", "a/b/c") && covers("a/+/c", "a/+/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("devices/x/#", "devices/#"));
        assert!(!covers("#", "$SYS/#") && covers("$SYS/#", "$SYS/x"));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("+".to_string()),
            Just("$s".to_string())
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(level(), 1..4), any::<bool>()).prop_map(|(mut ls, hash)| {
            if hash {
                ls.push("#".into());
            }
            ls.join("/")
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("$s")], 1..6).prop_map(|v| v.join("/"))
    }

    proptest! {
        // If outer covers inner, no topic matched by inner escapes outer.
        #[test]
        fn covers_is_sound(outer in filter(), inner in filter(), t in topic()) {
            if covers(&outer, &inner) && matches(&t, &inner) {
                prop_assert!(matches(&t, &outer), "{outer} covers {inner} but not {t}");
            }
        }

        #[test]
        fn a_filter_covers_itself_and_is_covered_by_hash(f in filter()) {
            prop_assert!(covers(&f, &f));
            if !f.starts_with('$') {
                prop_assert!(covers("#", &f));
            }
        }

        #[test]
        fn validity_never_panics(s in ".{0,40}") {
            let _ = valid_filter(&s);
            let _ = valid_topic(&s);
            let _ = strip_share(&s);
        }
    }
}
