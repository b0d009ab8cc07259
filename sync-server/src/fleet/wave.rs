//! Wave sizes (`1,10%,100%`) and the failure threshold (`--max-failed 2` or `10%`).
//!
//! Each entry of a wave list is a cumulative mark: `1,10%,100%` over 40 hosts activates 1 host,
//! then the hosts up to 10% of the fleet (4, so 3 more), then the rest. Percentages round up, so
//! a wave is never empty for want of a fraction of a host; a mark that does not go beyond the
//! previous one adds no wave, and hosts left after the last mark form one final wave, so every
//! host is in exactly one wave whatever the list says. A failure threshold in percent rounds
//! down: "at most 10% may fail" allows none of 6 hosts.

use std::fmt;
use std::str::FromStr;

/// Why a wave list or a threshold is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaveError {
    #[error("{text:?} is not a wave list; write marks separated by commas, each a host count or a percentage of the hosts, e.g. 1,10%,100%")]
    Waves { text: String },
    #[error("{text:?} in the wave list: {problem}")]
    Mark { text: String, problem: &'static str },
    #[error(
        "{text:?} is not a failure threshold; write a host count (0, 2) or a percentage (10%)"
    )]
    MaxFailed { text: String },
}

/// How far a wave reaches, counted from the first host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Hosts(u64),
    /// Per cent of the hosts, 1 to 100.
    Percent(u8),
}

impl Mark {
    /// Hosts covered by this mark out of `n`.
    fn reach(self, n: usize) -> usize {
        match self {
            Mark::Hosts(h) => usize::try_from(h).unwrap_or(usize::MAX).min(n),
            // Rounds up: 10% of 6 hosts is one host, not none.
            Mark::Percent(p) => (n * usize::from(p)).div_ceil(100),
        }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mark::Hosts(h) => write!(f, "{h}"),
            Mark::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A validated wave list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waves(Vec<Mark>);

impl Waves {
    /// One wave with every host.
    pub fn all_at_once() -> Waves {
        Waves(vec![Mark::Percent(100)])
    }

    pub fn marks(&self) -> &[Mark] {
        &self.0
    }

    /// The sizes of the waves over `n` hosts, in order; they add up to `n` and none is empty.
    pub fn sizes(&self, n: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut covered = 0;
        for mark in &self.0 {
            let reach = mark.reach(n);
            if reach > covered {
                sizes.push(reach - covered);
                covered = reach;
            }
        }
        if covered < n {
            sizes.push(n - covered);
        }
        sizes
    }
}

impl Default for Waves {
    /// A canary, then a tenth of the fleet, then the rest.
    fn default() -> Waves {
        Waves(vec![Mark::Hosts(1), Mark::Percent(10), Mark::Percent(100)])
    }
}

impl FromStr for Waves {
    type Err = WaveError;
    fn from_str(text: &str) -> Result<Waves, WaveError> {
        let whole = || WaveError::Waves {
            text: text.chars().take(200).collect(),
        };
        if text.trim().is_empty() || text.len() > 4096 {
            return Err(whole());
        }
        let mut marks = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let bad = |problem| WaveError::Mark {
                text: part.chars().take(50).collect(),
                problem,
            };
            let mark = if let Some(p) = part.strip_suffix('%') {
                match p.parse::<u8>() {
                    Ok(p @ 1..=100) if !p_has_sign(part) => Mark::Percent(p),
                    Ok(0) => return Err(bad("a wave of 0% activates nothing")),
                    Ok(_) => return Err(bad("a percentage goes from 1% to 100%")),
                    Err(_) => return Err(bad("not a percentage")),
                }
            } else {
                match part.parse::<u64>() {
                    Ok(0) => return Err(bad("a wave of 0 hosts activates nothing")),
                    Ok(h) if !p_has_sign(part) => Mark::Hosts(h),
                    _ if part.is_empty() => return Err(whole()),
                    _ => return Err(bad("not a host count or a percentage")),
                }
            };
            marks.push(mark);
        }
        Ok(Waves(marks))
    }
}

/// `parse` accepts a leading `+`; a wave list has no use for one.
fn p_has_sign(text: &str) -> bool {
    text.starts_with('+')
}

impl fmt::Display for Waves {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{m}")?;
        }
        Ok(())
    }
}

/// How many hosts may fail staging before nothing is activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaxFailed {
    /// No failure at all (the default).
    #[default]
    None,
    Hosts(u64),
    /// Per cent of the hosts, rounded down.
    Percent(u8),
}

impl MaxFailed {
    /// Failures tolerated out of `n` hosts.
    pub fn allowed(self, n: usize) -> usize {
        match self {
            MaxFailed::None => 0,
            MaxFailed::Hosts(h) => usize::try_from(h).unwrap_or(usize::MAX),
            MaxFailed::Percent(p) => n * usize::from(p) / 100,
        }
    }
}

impl FromStr for MaxFailed {
    type Err = WaveError;
    fn from_str(text: &str) -> Result<MaxFailed, WaveError> {
        let bad = || WaveError::MaxFailed {
            text: text.chars().take(50).collect(),
        };
        let t = text.trim();
        if p_has_sign(t) {
            return Err(bad());
        }
        if let Some(p) = t.strip_suffix('%') {
            return match p.parse::<u8>() {
                Ok(0) => Ok(MaxFailed::None),
                Ok(p @ 1..=100) => Ok(MaxFailed::Percent(p)),
                _ => Err(bad()),
            };
        }
        match t.parse::<u64>() {
            Ok(0) => Ok(MaxFailed::None),
            Ok(h) => Ok(MaxFailed::Hosts(h)),
            Err(_) => Err(bad()),
        }
    }
}

impl fmt::Display for MaxFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxFailed::None => f.write_str("0"),
            MaxFailed::Hosts(h) => write!(f, "{h}"),
            MaxFailed::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_sizes_cover_every_host_once() {
        let table: &[(&str, usize, &[usize])] = &[
            ("1,10%,100%", 40, &[1, 3, 36]),
            ("1,10%,100%", 6, &[1, 5]),
            ("1,10%,100%", 1, &[1]),
            ("1,10%,100%", 0, &[]),
            ("1,10%,100%", 11, &[1, 1, 9]),
            ("100%", 6, &[6]),
            ("2,2", 6, &[2, 4]),
            ("3", 6, &[3, 3]),
            ("50%", 5, &[3, 2]),
            ("10,20", 6, &[6]),
            ("1,2,3", 6, &[1, 1, 1, 3]),
            ("5,1", 6, &[5, 1]),
            ("33%,66%,100%", 3, &[1, 1, 1]),
            ("1, 50% ,100%", 4, &[1, 1, 2]),
        ];
        for (text, n, want) in table {
            let w: Waves = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            let sizes = w.sizes(*n);
            assert_eq!(sizes, *want, "{text} over {n}");
            assert_eq!(sizes.iter().sum::<usize>(), *n, "{text} over {n}");
        }
        assert_eq!(Waves::default().to_string(), "1,10%,100%");
        assert_eq!(Waves::all_at_once().sizes(7), [7]);
    }

    #[test]
    fn bad_wave_lists_say_what_is_wrong() {
        let table = [
            ("", "wave list"),
            ("1,,2", "wave list"),
            ("0", "0 hosts"),
            ("0%", "0%"),
            ("101%", "1% to 100%"),
            ("x", "not a host count"),
            ("-1", "not a host count"),
            ("+1", "not a host count"),
            ("1.5%", "not a percentage"),
            ("%", "not a percentage"),
        ];
        for (text, want) in table {
            let e = text.parse::<Waves>().expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn failure_thresholds() {
        let table: &[(&str, usize, usize)] = &[
            ("0", 10, 0),
            ("0%", 10, 0),
            ("2", 10, 2),
            ("2", 1, 2),
            ("10%", 6, 0),
            ("10%", 10, 1),
            ("10%", 19, 1),
            ("50%", 5, 2),
            ("100%", 7, 7),
        ];
        for (text, n, want) in table {
            let m: MaxFailed = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(m.allowed(*n), *want, "{text} of {n}");
        }
        for bad in ["", "x", "-1", "+1", "101%", "1.5%", "%"] {
            let e = bad.parse::<MaxFailed>().expect_err(bad);
            assert!(e.to_string().contains("failure threshold"), "{bad}: {e}");
        }
        assert_eq!(MaxFailed::default().allowed(100), 0);
    }
}
