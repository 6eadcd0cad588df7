//! Sizes in bytes on the command line and in the configuration: `64MiB`, `512KiB`, `1GiB`, or a
//! bare number of bytes. `K`/`M`/`G` and `KB`/`MB`/`GB` are taken as the binary units too (a
//! reserve is not sold by the kilobyte).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Parses `64MiB`, `512KiB`, `1GiB`, `0` or a bare number of bytes.
pub fn parse(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: u64 =
        number.parse().map_err(|_| format!("{text:?} is not a size (try 64MiB, 512KiB or a number of bytes)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (use KiB, MiB, GiB or TiB)")),
    };
    value.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// A size in bytes, written as [`parse`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        let text = match n {
            0 => "0".to_owned(),
            _ if n.is_multiple_of(1 << 30) => format!("{}GiB", n >> 30),
            _ if n.is_multiple_of(1 << 20) => format!("{}MiB", n >> 20),
            _ if n.is_multiple_of(1 << 10) => format!("{}KiB", n >> 10),
            _ => n.to_string(),
        };
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Bytes(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => parse(&t).map(Size).map_err(serde::de::Error::custom),
            Raw::Bytes(b) => Ok(Size(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse, Size};

    #[test]
    fn units() {
        assert_eq!(parse("64MiB"), Ok(64 << 20));
        assert_eq!(parse("64M"), Ok(64 << 20));
        assert_eq!(parse("512 KiB"), Ok(512 << 10));
        assert_eq!(parse("1gib"), Ok(1 << 30));
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("4096"), Ok(4096));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        for (text, says) in [
            ("", "not a size"),
            ("MiB", "not a size"),
            ("-1MiB", "not a size"),
            ("1.5MiB", "unknown unit"),
            ("5 parsecs", "unknown unit"),
            ("99999999999TiB", "too large"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn written_as_read() {
        for n in [0, 1 << 30, 64 << 20, 3 << 10, 1000] {
            let text = serde_json::to_value(Size(n)).expect("ser");
            assert_eq!(serde_json::from_value::<Size>(text).expect("de"), Size(n));
        }
    }
}
