//! ACL rule subjects (`who:`), parsed when the config is read: the broker gets a [`Who`],
//! never the text. Matching a subject against a connection is the broker's (`broker::auth`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Whom an ACL rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    Everyone,
    Anonymous,
    AnyUser,
    User(String),
    /// A client id, with an optional trailing `*`.
    Client(String),
}

impl Who {
    pub fn parse(s: &str) -> Result<Who, String> {
        Ok(match s {
            "*" => Who::Everyone,
            "anonymous" => Who::Anonymous,
            "user:*" => Who::AnyUser,
            _ => match s.split_once(':') {
                Some(("user", name)) if !name.is_empty() => Who::User(name.to_string()),
                Some(("client", id)) if !id.is_empty() => Who::Client(id.to_string()),
                _ => {
                    return Err(format!(
                        "`{s}` is not a rule subject: use `*`, `anonymous`, `user:*`, `user:NAME` or `client:ID`"
                    ))
                }
            },
        })
    }
}

/// The text [`Who::parse`] reads, so a config written back parses to the same subjects.
impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Everyone => f.write_str("*"),
            Who::Anonymous => f.write_str("anonymous"),
            Who::AnyUser => f.write_str("user:*"),
            Who::User(name) => write!(f, "user:{name}"),
            Who::Client(id) => write!(f, "client:{id}"),
        }
    }
}

impl Serialize for Who {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Who {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Who::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_parse_and_print_back() {
        for s in ["*", "anonymous", "user:*", "user:alice", "client:sensor-*"] {
            assert_eq!(Who::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Who::parse("user:alice"), Ok(Who::User("alice".into())));
        assert_eq!(Who::parse("client:a*"), Ok(Who::Client("a*".into())));
        for bad in ["", "root", "user:", "client:", "group:x"] {
            assert!(Who::parse(bad).unwrap_err().contains("is not a rule subject"), "{bad}");
        }
    }
}
