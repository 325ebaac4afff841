//! Value types for config fields that users write as text: durations (`500ms`, `7d`),
//! sizes (`512MiB`) and socket addresses. Each validates while it is deserialized, so a bad
//! value is reported by serde_yaml with its line and by serde_path_to_error with its key.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// A duration written as text: `500ms`, `15s`, `10m`, `7d`, `1h 30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. `500ms`, `30s`, `7d`"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size in bytes written as text (`64KiB`, `512MiB`, `1GB`) or as a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|e| format!("`{s}` is not a size ({e}); write e.g. `256KiB`, `512MiB`"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Exact, so what is written reads back the same: the largest binary unit that divides it.
impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match UNITS.iter().find(|(u, _)| self.0 >= *u && self.0.is_multiple_of(*u)) {
            Some((u, name)) => write!(f, "{}{name}", self.0 / u),
            None => write!(f, "{}B", self.0),
        }
    }
}

/// A rate written `500/s`, `30/m` or `1000/h`, in messages per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate(pub f64);

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a rate; write e.g. `500/s`, `30/m`");
        let (n, per) = s.trim().split_once('/').ok_or_else(bad)?;
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let secs = match per.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        if !(n > 0.0 && n.is_finite()) {
            return Err(format!("`{s}`: the rate must be above 0"));
        }
        Ok(Rate(n / secs))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}/s", self.0))
    }
}

/// A socket address to bind: `127.0.0.1:1883`, `[::]:8883`. Port 0 is allowed (the OS picks)
/// so tests can run many gateways side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind(pub SocketAddr);

impl FromStr for Bind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<SocketAddr>()
            .map(Bind)
            .map_err(|_| format!("`{s}` is not an address to bind: write IP:PORT, e.g. `0.0.0.0:1883` or `[::]:8883`"))
    }
}

impl<'de> Deserialize<'de> for Bind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Bind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_as_users_write_them() {
        assert_eq!("500ms".parse::<Dur>().unwrap().0, Duration::from_millis(500));
        assert_eq!("7d".parse::<Dur>().unwrap().0, Duration::from_secs(7 * 86400));
        assert!("fast".parse::<Dur>().unwrap_err().contains("not a duration"));
        assert_eq!("512MiB".parse::<Size>().unwrap().0, 512 * 1024 * 1024);
        assert_eq!("256 KiB".parse::<Size>().unwrap().0, 256 * 1024);
        assert!("lots".parse::<Size>().is_err());
        for n in [0, 1, 1023, 1024, 1536, 2 << 20, 3 << 30, 12345678] {
            assert_eq!(Size(n).to_string().parse::<Size>().unwrap(), Size(n));
        }
        assert!("localhost:1883".parse::<Bind>().is_err());
        assert_eq!("30/m".parse::<Rate>().unwrap(), Rate(0.5));
        assert!("fast/s".parse::<Rate>().is_err() && "0/s".parse::<Rate>().is_err());
        assert!("0.0.0.0:1883".parse::<Bind>().is_ok());
    }
}
