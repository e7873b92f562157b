//! `/proc/net/xfrm_stat`: the kernel's per-netns XFRM counters.
//!
//! Parsed by name, never by position: the set of counters grows with the
//! kernel version (29 in 6.1, 33 in 6.18).

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: expected `Name value`, got {text:?}")]
    Malformed { line: usize, text: String },
    #[error("line {line}: counter {name} appears twice")]
    Duplicate { line: usize, name: String },
}

/// Counter values by their `/proc` name (e.g. `XfrmInNoStates`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XfrmStat(pub BTreeMap<String, u64>);

impl XfrmStat {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut counters = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let mut fields = raw.split_whitespace();
            let (Some(name), Some(value), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(ParseError::Malformed {
                    line,
                    text: raw.into(),
                });
            };
            let Ok(value) = value.parse::<u64>() else {
                return Err(ParseError::Malformed {
                    line,
                    text: raw.into(),
                });
            };
            if !name.starts_with("Xfrm") {
                return Err(ParseError::Malformed {
                    line,
                    text: raw.into(),
                });
            }
            if counters.insert(name.to_string(), value).is_some() {
                return Err(ParseError::Duplicate {
                    line,
                    name: name.into(),
                });
            }
        }
        Ok(Self(counters))
    }

    /// Counters that moved since `before`, with their increase. A counter
    /// absent from `before` counts from zero (a netns created meanwhile).
    pub fn delta_since(&self, before: &XfrmStat) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .filter_map(|(name, now)| {
                let then = before.0.get(name).copied().unwrap_or(0);
                let moved = now.saturating_sub(then);
                (moved > 0).then(|| (name.clone(), moved))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE_6_18: &str = "XfrmInError                     \t0\nXfrmInBufferError               \t0\nXfrmInNoStates                  \t4\nXfrmOutPolBlock                 \t7\nXfrmOutNoQueueSpace             \t0\n";

    #[test]
    fn parses_names_and_values() {
        let stat = XfrmStat::parse(SAMPLE_6_18).unwrap();
        assert_eq!(stat.0.len(), 5);
        assert_eq!(stat.0["XfrmInNoStates"], 4);
        assert_eq!(stat.0["XfrmOutPolBlock"], 7);
    }

    #[test]
    fn delta_lists_only_counters_that_moved() {
        let before = XfrmStat::parse("XfrmInNoStates 4\nXfrmOutPolBlock 7\n").unwrap();
        let after = XfrmStat::parse("XfrmInNoStates 4\nXfrmOutPolBlock 12\nXfrmNew 2\n").unwrap();
        let delta = after.delta_since(&before);
        assert_eq!(delta.len(), 2);
        assert_eq!(delta["XfrmOutPolBlock"], 5);
        assert_eq!(delta["XfrmNew"], 2);
    }

    #[test]
    fn rejects_malformed_lines() {
        assert_eq!(
            XfrmStat::parse("XfrmInError 0\nXfrmInNoStates four\n"),
            Err(ParseError::Malformed {
                line: 2,
                text: "XfrmInNoStates four".into()
            })
        );
        assert!(XfrmStat::parse("XfrmInError\n").is_err());
        assert!(XfrmStat::parse("XfrmInError 1 2\n").is_err());
        assert!(XfrmStat::parse("Ip: 1\n").is_err());
        assert!(matches!(
            XfrmStat::parse("XfrmInError 1\nXfrmInError 2\n"),
            Err(ParseError::Duplicate { line: 2, .. })
        ));
        assert_eq!(XfrmStat::parse("").unwrap(), XfrmStat::default());
    }

    #[test]
    fn reads_this_machine() {
        if let Ok(text) = std::fs::read_to_string("/proc/net/xfrm_stat") {
            let stat = XfrmStat::parse(&text).unwrap();
            assert!(stat.0.contains_key("XfrmInNoStates"));
        }
    }
}
