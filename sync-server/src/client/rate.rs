//! `--bwlimit`: a token bucket shared by every file stream of a push (and by every host of a
//! fleet push, so the limit is the source's total).
//!
//! [`Bucket`] is the arithmetic, with the time passed in; [`RateLimit`] puts it behind a lock and
//! sleeps on tokio's clock. Payloads are written in chunks of at most [`RateLimit::chunk`] bytes,
//! each taken from the bucket first, so the rate holds over windows much shorter than a file.

use std::sync::Mutex;
use std::time::Duration;

/// How a rate was written wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bandwidth limit {0:?} is not a rate: write KiB/s as a number (1000), or with a unit: 500K, 12M, 1G (bytes per second, binary units)")]
pub struct RateError(pub String);

/// Parses a `--bwlimit` value the way rsync reads it: a bare number is KiB/s; `K`, `M`, `G`
/// (optionally followed by `B`, `iB` or `/s`) scale by 1024. Zero means no limit.
pub fn parse_rate(text: &str) -> Result<Option<u64>, RateError> {
    let err = || RateError(text.to_owned());
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let digits = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let value: f64 = number.parse().map_err(|_| err())?;
    let scale: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "K" | "KB" | "KIB" => 1024.0,
        "B" => 1.0,
        "M" | "MB" | "MIB" => 1024.0 * 1024.0,
        "G" | "GB" | "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(match bytes as u64 {
        0 => None,
        n => Some(n),
    })
}

/// A token bucket of `rate` bytes per second holding at most `burst` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Duration,
}

impl Bucket {
    /// Starts full at time `now`.
    pub fn new(rate: u64, burst: u64, now: Duration) -> Bucket {
        let burst = burst.max(1) as f64;
        Bucket {
            rate: rate.max(1) as f64,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes `n` bytes at `now`; returns how long the caller must wait before sending them (zero
    /// when the bucket had them). Debt is allowed, so a caller asking for more than `burst` is
    /// not stuck: it waits until the rate has paid for it.
    pub fn take(&mut self, n: u64, now: Duration) -> Duration {
        let elapsed = now.saturating_sub(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A [`Bucket`] shared by concurrent writers, on tokio's clock.
#[derive(Debug)]
pub struct RateLimit {
    bucket: Mutex<Bucket>,
    origin: tokio::time::Instant,
    rate: u64,
}

impl RateLimit {
    /// `rate` bytes per second, with a burst of a tenth of a second (at least one chunk).
    pub fn new(rate: u64) -> RateLimit {
        let burst = (rate / 10).max(Self::chunk_for(rate) as u64);
        RateLimit {
            bucket: Mutex::new(Bucket::new(rate, burst, Duration::ZERO)),
            origin: tokio::time::Instant::now(),
            rate,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn chunk_for(rate: u64) -> usize {
        // About 10 ms of traffic, between 4 KiB and 256 KiB.
        usize::try_from(rate / 100)
            .unwrap_or(usize::MAX)
            .clamp(4 << 10, 256 << 10)
    }

    /// The most bytes to write between two calls of [`RateLimit::acquire`].
    pub fn chunk(&self) -> usize {
        Self::chunk_for(self.rate)
    }

    /// Waits until `n` more bytes may go out.
    pub async fn acquire(&self, n: usize) {
        let wait = {
            let now = self.origin.elapsed();
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            b.take(n as u64, now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_like_rsync() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1000", Some(1000 * 1024)),
            ("0", None),
            ("512K", Some(512 * 1024)),
            ("12M", Some(12 << 20)),
            ("12MB", Some(12 << 20)),
            ("1G", Some(1 << 30)),
            ("1.5M", Some(3 << 19)),
            ("100B", Some(100)),
            ("2MiB/s", Some(2 << 20)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_rate(text).unwrap(), *want, "{text}");
        }
        for bad in ["", "fast", "10X", "-5", "1e999M", "M"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.to_string().contains("500K"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_bucket_lets_a_burst_through_then_holds_the_rate() {
        let s = Duration::from_secs_f64;
        // 1000 B/s, burst 100.
        let mut b = Bucket::new(1000, 100, s(0.0));
        assert_eq!(b.take(100, s(0.0)), Duration::ZERO, "the burst is free");
        assert_eq!(b.take(50, s(0.0)), s(0.05), "then 50 B cost 50 ms");
        // 0.05 s later the debt is paid; another 0.1 s buys 100 B.
        assert_eq!(b.take(100, s(0.15)), Duration::ZERO);
        // A long pause refills only up to the burst.
        assert_eq!(b.take(300, s(10.0)), s(0.2));
    }

    #[test]
    fn any_sequence_of_takes_keeps_to_the_rate() {
        // Whatever the request sizes, sending each at (its time + its wait) never exceeds
        // burst + rate × elapsed.
        let (rate, burst) = (10_000u64, 1_000u64);
        let mut b = Bucket::new(rate, burst, Duration::ZERO);
        let mut now = Duration::ZERO;
        let mut sent = 0u64;
        for i in 0..500u64 {
            let n = (i * 7919) % 3_000 + 1;
            let wait = b.take(n, now);
            now += wait;
            sent += n;
            let allowed = burst as f64 + rate as f64 * now.as_secs_f64();
            assert!(sent as f64 <= allowed + 1.0, "step {i}: {sent} > {allowed}");
            // The caller may also come back later than asked.
            now += Duration::from_micros((i * 31) % 700);
        }
        // Which means the whole took at least what the rate requires beyond the burst.
        let floor = (sent - burst) as f64 / rate as f64;
        assert!(now.as_secs_f64() >= floor - 0.01);
    }
}
