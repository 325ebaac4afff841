//! Bridge rules: which topics cross a bridge and what they are called on the other side.
//! A source filter captures what its wildcards matched (`{1}` the first `+`, `{#}` the `#`
//! tail) and a template fills them in, so topics can be renamed, prefixed and flattened.
//!
//! Compiled once, when the config is read: a rule that does not compile is a config error, and
//! each [`Bridge`](super::Bridge) keeps its compiled rules for the bridge to run.

use super::{BridgeRule, Direction};
use crate::topic as topics;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    /// The n-th `+` of the source filter (0-based).
    Cap(usize),
    /// What the source's `#` matched.
    Tail,
}

/// Source filter plus target template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    filter: String,
    /// Per level of the template: its parts.
    template: Vec<Vec<Part>>,
}

fn pluses(filter: &str) -> usize {
    filter.split('/').filter(|l| *l == "+").count()
}

fn parse_template(t: &str, pluses: usize, hash: bool, side: &str) -> Result<Vec<Vec<Part>>, String> {
    let mut next = 0usize;
    let levels: Vec<&str> = t.split('/').collect();
    let mut out = Vec::with_capacity(levels.len());
    for (i, level) in levels.iter().enumerate() {
        let parts = match *level {
            "+" => {
                next += 1;
                vec![Part::Cap(next - 1)]
            }
            "#" if i == levels.len() - 1 => vec![Part::Tail],
            "#" => return Err(format!("{side} `{t}`: `#` may only be the last level")),
            l => parse_level(l, t, side)?,
        };
        for p in &parts {
            match p {
                Part::Cap(n) if *n >= pluses => {
                    return Err(format!(
                        "{side} `{t}` uses capture {{{}}} but the source filter has only {pluses} `+`",
                        n + 1
                    ))
                }
                Part::Tail if !hash => {
                    return Err(format!("{side} `{t}` uses `{{#}}` but the source filter has no `#`"))
                }
                _ => {}
            }
        }
        out.push(parts);
    }
    Ok(out)
}

fn parse_level(l: &str, t: &str, side: &str) -> Result<Vec<Part>, String> {
    let mut parts = vec![];
    let mut rest = l;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Lit(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("{side} `{t}`: unclosed `{{`"))?
            + open;
        let inner = &rest[open + 1..close];
        parts.push(match inner {
            "#" => Part::Tail,
            n => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Part::Cap(n - 1),
                _ => {
                    return Err(format!(
                        "{side} `{t}`: `{{{inner}}}` is not a capture (use {{1}}, {{2}}, ... or {{#}})"
                    ))
                }
            },
        });
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Lit(rest.to_string()));
    }
    if parts
        .iter()
        .any(|p| matches!(p, Part::Lit(s) if s.contains(['+', '#', '}'])))
    {
        return Err(format!("{side} `{t}`: wildcards may only stand as whole levels"));
    }
    Ok(parts)
}

impl Mapping {
    fn new(filter: &str, template: &str, source: &str, target: &str) -> Result<Mapping, String> {
        if !topics::valid_filter(filter) {
            return Err(format!("{source} `{filter}` is not a valid topic filter"));
        }
        if filter.starts_with('$') {
            return Err(format!("{source} `{filter}`: `$` topics cannot be bridged"));
        }
        if template.is_empty() || template.starts_with('$') {
            return Err(format!(
                "{target} `{template}`: a topic must be non-empty and not start with `$`"
            ));
        }
        let template = parse_template(template, pluses(filter), filter.ends_with('#'), target)?;
        Ok(Mapping {
            filter: filter.to_string(),
            template,
        })
    }

    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// The target topic for `topic`, if it matches the source filter.
    pub fn map(&self, topic: &str) -> Option<String> {
        if !topics::matches(topic, &self.filter) {
            return None;
        }
        let mut caps = vec![];
        let mut tail = None;
        let mut t = topic.split('/');
        for f in self.filter.split('/') {
            match f {
                "+" => caps.push(t.next()?),
                "#" => {
                    let rest: Vec<&str> = t.by_ref().collect();
                    tail = Some(rest.join("/"));
                }
                _ => {
                    t.next()?;
                }
            }
        }
        let mut levels: Vec<String> = Vec::with_capacity(self.template.len());
        for (i, parts) in self.template.iter().enumerate() {
            // An empty `#` match (`a/#` matched `a`) drops a level that is only the tail.
            if parts == &[Part::Tail] && tail.as_deref() == Some("") && i == self.template.len() - 1 && i > 0 {
                continue;
            }
            let mut level = String::new();
            for p in parts {
                match p {
                    Part::Lit(s) => level.push_str(s),
                    Part::Cap(n) => level.push_str(caps.get(*n)?),
                    Part::Tail => level.push_str(tail.as_deref()?),
                }
            }
            levels.push(level);
        }
        let out = levels.join("/");
        topics::valid_topic(&out).then_some(out)
    }

    /// The template read back as a filter, for `both` rules: each capture must fill a whole
    /// level once, so the mapping can be inverted.
    fn invert(&self, template_side: &str, filter_side: &str) -> Result<Mapping, String> {
        let n = pluses(&self.filter);
        let mut position_of_cap = vec![None; n];
        let mut filter_levels = vec![];
        let mut plus_index = 0usize;
        for (i, parts) in self.template.iter().enumerate() {
            match parts.as_slice() {
                [Part::Cap(c)] => {
                    if position_of_cap[*c].replace(plus_index).is_some() {
                        return Err(format!(
                            "a `both` rule may use each capture once; {template_side} repeats {{{}}}",
                            c + 1
                        ));
                    }
                    plus_index += 1;
                    filter_levels.push("+".to_string());
                }
                [Part::Tail] if i == self.template.len() - 1 => filter_levels.push("#".to_string()),
                parts if parts.iter().all(|p| matches!(p, Part::Lit(_))) => filter_levels.push(
                    parts
                        .iter()
                        .map(|p| if let Part::Lit(s) = p { s.as_str() } else { "" })
                        .collect(),
                ),
                _ => {
                    return Err(format!(
                        "in a `both` rule every capture of {template_side} must fill a whole level"
                    ))
                }
            }
        }
        let has_tail = self.template.last().is_some_and(|l| l == &[Part::Tail]);
        if position_of_cap.iter().any(Option::is_none) || has_tail != self.filter.ends_with('#') {
            return Err(format!(
                "a `both` rule must carry every wildcard of {filter_side} into {template_side}"
            ));
        }
        // The inverse template: the source filter's k-th `+` takes what the inverse source's
        // position_of_cap[k]-th `+` matched.
        let mut k = 0usize;
        let template = self
            .filter
            .split('/')
            .map(|l| match l {
                "+" => {
                    k += 1;
                    vec![Part::Cap(position_of_cap[k - 1].expect("checked above"))]
                }
                "#" => vec![Part::Tail],
                l => vec![Part::Lit(l.to_string())],
            })
            .collect();
        Ok(Mapping {
            filter: filter_levels.join("/"),
            template,
        })
    }
}

/// A compiled rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Local topic → remote topic, for `out` and `both`.
    pub out: Option<Mapping>,
    /// Remote topic → local topic, for `in` and `both`.
    pub inbound: Option<Mapping>,
    pub qos: u8,
    pub spool_qos0: bool,
}

impl Rule {
    pub fn compile(r: &BridgeRule) -> Result<Rule, String> {
        let (out, inbound) = match r.direction {
            Direction::Out => (
                Some(Mapping::new(&r.local, &r.remote, "local filter", "remote template")?),
                None,
            ),
            Direction::In => (
                None,
                Some(Mapping::new(&r.remote, &r.local, "remote filter", "local template")?),
            ),
            Direction::Both => {
                let out = Mapping::new(&r.local, &r.remote, "local filter", "remote template")?;
                let inbound = out.invert("remote", "local")?;
                (Some(out), Some(inbound))
            }
        };
        Ok(Rule {
            out,
            inbound,
            qos: r.qos,
            spool_qos0: r.spool_qos0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(dir: Direction, local: &str, remote: &str) -> Result<Rule, String> {
        Rule::compile(&BridgeRule {
            direction: dir,
            local: local.into(),
            remote: remote.into(),
            qos: 1,
            spool_qos0: false,
        })
    }

    #[test]
    fn captures_rename_prefix_and_flatten() {
        let r = rule(Direction::Out, "sensor/+/live", "site1/sensor/{1}/live").unwrap();
        assert_eq!(
            r.out.as_ref().unwrap().map("sensor/kitchen/live").as_deref(),
            Some("site1/sensor/kitchen/live")
        );
        assert_eq!(r.out.as_ref().unwrap().map("sensor/kitchen/1m"), None);
        let r = rule(Direction::In, "cmd/#", "site1/cmd/#").unwrap();
        assert_eq!(
            r.inbound.as_ref().unwrap().map("site1/cmd/plug/set").as_deref(),
            Some("cmd/plug/set")
        );
        let r = rule(Direction::Out, "a/+/b/+", "flat/{2}-{1}").unwrap();
        assert_eq!(r.out.as_ref().unwrap().map("a/x/b/y").as_deref(), Some("flat/y-x"));
        let r = rule(Direction::Out, "a/#", "up/{#}").unwrap();
        assert_eq!(r.out.as_ref().unwrap().map("a").as_deref(), Some("up"));
        assert_eq!(r.out.as_ref().unwrap().map("a/b/c").as_deref(), Some("up/b/c"));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        assert!(rule(Direction::Out, "a/+", "b/{2}").unwrap_err().contains("only 1 `+`"));
        assert!(rule(Direction::Out, "a/+", "b/{#}").unwrap_err().contains("no `#`"));
        assert!(rule(Direction::Out, "a/#/b", "x")
            .unwrap_err()
            .contains("not a valid topic filter"));
        assert!(rule(Direction::Out, "a/+", "b/x+y")
            .unwrap_err()
            .contains("whole levels"));
        assert!(rule(Direction::Both, "a/+/+", "b/{1}")
            .unwrap_err()
            .contains("every wildcard"));
        assert!(rule(Direction::Both, "a/+", "b/x{1}")
            .unwrap_err()
            .contains("whole level"));
        assert!(rule(Direction::Out, "$SYS/#", "x/#")
            .unwrap_err()
            .contains("cannot be bridged"));
    }

    fn level() -> impl Strategy<Value = String> {
        "[a-z]{1,4}"
    }

    proptest! {
        // A `both` rule maps a topic out and back to itself.
        #[test]
        fn both_rules_round_trip(prefix in level(), rprefix in level(), swap in any::<bool>(), a in level(), b in level(), tail in prop::collection::vec(level(), 0..3)) {
            let local = format!("{prefix}/+/+/#");
            let remote = if swap { format!("{rprefix}/{{2}}/x/{{1}}/{{#}}") } else { format!("{rprefix}/+/+/#") };
            let r = rule(Direction::Both, &local, &remote).unwrap();
            let mut topic = format!("{prefix}/{a}/{b}");
            for t in &tail { topic.push('/'); topic.push_str(t); }
            let up = r.out.as_ref().unwrap().map(&topic).unwrap();
            prop_assert!(topics::matches(&up, r.inbound.as_ref().unwrap().filter()));
            prop_assert_eq!(r.inbound.as_ref().unwrap().map(&up).unwrap(), topic);
        }

        // Whatever a template makes is a valid topic name, or nothing.
        #[test]
        fn mapped_topics_are_valid(t in "[a-z+/]{1,12}") {
            if let Ok(r) = rule(Direction::Out, "a/+/#", "b/{1}/{#}") {
                if let Some(out) = r.out.unwrap().map(&t) {
                    prop_assert!(topics::valid_topic(&out));
                }
            }
        }

        #[test]
        fn compiling_any_text_never_panics(l in "[a-z+#{}/0-9]{0,12}", r in "[a-z+#{}/0-9]{0,12}") {
            for d in [Direction::In, Direction::Out, Direction::Both] {
                let _ = rule(d, &l, &r);
            }
        }
    }
}
