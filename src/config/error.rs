//! Config errors that name the file, the line, the key path and the reason.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config: {reason}", file.display())]
    Read { file: PathBuf, reason: String },
    #[error("{}", Located(file, *line, key, reason))]
    Invalid {
        file: PathBuf,
        line: Option<usize>,
        key: String,
        reason: String,
    },
}

struct Located<'a>(&'a PathBuf, Option<usize>, &'a String, &'a String);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())?;
        if let Some(line) = self.1 {
            write!(f, ":{line}")?;
        }
        if self.2.is_empty() || self.2 == "." {
            write!(f, ": {}", self.3)
        } else {
            write!(f, ": key `{}`: {}", self.2, self.3)
        }
    }
}

impl ConfigError {
    pub(super) fn from_serde(file: &Path, text: &str, e: serde_path_to_error::Error<serde_yaml::Error>) -> Self {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let mut line = inner.location().map(|l| l.line()).or_else(|| locate(text, &key));
        let mut reason = inner.to_string();
        if let Some(at) = reason.rfind(" at line ") {
            reason.truncate(at);
        }
        // serde_yaml sometimes prefixes the path itself; it is already in `key`.
        if let Some(rest) = reason.strip_prefix(&format!("{key}: ")) {
            reason = rest.to_string();
        } else if let Some((_, rest)) = reason.split_once(": ").filter(|(node, _)| is_parent(node, &key)) {
            // A value our own types refused (a subject, a size): serde_yaml names the mapping it
            // was in and points at that mapping's first line. The key path says which value, so
            // its line is looked up as for the errors `validate` finds.
            line = locate(text, &key).or(line);
            reason = rest.to_string();
        }
        ConfigError::Invalid {
            file: file.to_path_buf(),
            line,
            key,
            reason,
        }
    }

    pub(super) fn invalid(file: &Path, text: &str, key: &str, reason: String) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            line: locate(text, key),
            key: key.to_string(),
            reason,
        }
    }

    /// The key path the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } => None,
        }
    }
}

/// `node` is a proper prefix of the key path `key` (`broker.acl[0]` of `broker.acl[0].who`).
fn is_parent(node: &str, key: &str) -> bool {
    !node.is_empty() && key.strip_prefix(node).is_some_and(|rest| rest.starts_with(['.', '[']))
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Seg::Key(name));
        }
        while let Some(end) = rest.find(']') {
            if let Ok(n) = rest[1..end].parse() {
                out.push(Seg::Index(n));
            }
            rest = &rest[end + 1..];
        }
    }
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Finds the 1-based line a key path points at, following block and flow YAML as people write
/// config files. Best effort: `None` when the text does not hold the path.
pub(crate) fn locate(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut pos = 0usize; // line index where the current node starts
    let mut found = None;
    let mut parent_indent: Option<usize> = None;
    for seg in segments(path) {
        match seg {
            Seg::Key(k) => {
                let start = if found.is_some() { pos } else { 0 };
                let pat = format!("{k}:");
                let hit = (start..lines.len()).find(|&i| {
                    let l = lines[i];
                    let t = l.trim_start().trim_start_matches("- ");
                    if l.trim_start().starts_with('#') {
                        return false;
                    }
                    if i > start && parent_indent.is_some_and(|p| indent(l) <= p && !l.trim().is_empty()) {
                        return false;
                    }
                    t.starts_with(&pat)
                        || l.contains(&format!("{{ {pat}"))
                        || l.contains(&format!(", {pat}"))
                        || l.contains(&format!("{{{pat}"))
                });
                let i = hit?;
                pos = i;
                found = Some(i);
                parent_indent = Some(indent(lines[i]));
            }
            Seg::Index(n) => {
                let base = found?;
                let key_indent = indent(lines[base]);
                let mut seen = 0usize;
                let mut item_indent = None;
                let mut hit = None;
                for (i, l) in lines.iter().enumerate().skip(base + 1) {
                    if l.trim().is_empty() || l.trim_start().starts_with('#') {
                        continue;
                    }
                    if indent(l) <= key_indent && !l.trim_start().starts_with("- ") {
                        break;
                    }
                    if l.trim_start().starts_with("- ") || l.trim() == "-" {
                        let ind = indent(l);
                        if *item_indent.get_or_insert(ind) == ind {
                            if seen == n {
                                hit = Some(i);
                                break;
                            }
                            seen += 1;
                        }
                    }
                }
                let i = hit?;
                pos = i;
                found = Some(i);
                // Keys of this item sit deeper than the dash.
                parent_indent = Some(indent(lines[i]));
                // A key on the dash line itself belongs to the item: allow it.
                if let Some(p) = parent_indent.as_mut() {
                    *p = p.saturating_sub(1);
                }
            }
        }
    }
    found.map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::locate;
    use std::path::Path;

    const TEXT: &str = "gateway:\n  id: a\nbroker:\n  listeners:\n    - { bind: \"127.0.0.1:1\", protocol: mqtt }\n    - bind: \"0.0.0.0:2\"\n      protocol: mqtt\n  users: []\n";

    #[test]
    fn locates_block_and_flow_keys() {
        assert_eq!(locate(TEXT, "gateway.id"), Some(2));
        assert_eq!(locate(TEXT, "broker.listeners"), Some(4));
        assert_eq!(locate(TEXT, "broker.listeners[0].bind"), Some(5));
        assert_eq!(locate(TEXT, "broker.listeners[1].bind"), Some(6));
        assert_eq!(locate(TEXT, "broker.listeners[1].protocol"), Some(7));
        assert_eq!(locate(TEXT, "broker.users"), Some(8));
        assert_eq!(locate(TEXT, "broker.nothing"), None);
    }

    #[test]
    fn a_value_refused_inside_a_mapping_is_named_at_its_own_line() {
        let text = "broker:\n  limits:\n    max_connections: 5\n    max_packet_size: lots\n";
        let e = super::super::Config::from_yaml(text, Path::new("t.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t.yaml:4: key `broker.limits.max_packet_size`: `lots` is not a size"),
            "{e}"
        );
        let text = "broker:\n  limits:\n    max_conections: 5\n";
        let e = super::super::Config::from_yaml(text, Path::new("t.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t.yaml:3: key `broker.limits.max_conections`: unknown field"),
            "{e}"
        );
    }
}
