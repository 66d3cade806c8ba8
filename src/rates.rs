//! Requests per client address per minute (new connections, publish requests): a sliding window
//! over two fixed minutes, as rate-limiting WAF rules count. Pure: the caller passes the time.
//! Memory is bounded: IPv6 addresses count by their /64 (one host's usual allocation), and past
//! `MAX_ADDRESSES` in one minute the rest share one counter.

use std::collections::HashMap;
use std::net::IpAddr;

/// Distinct addresses counted apart in one minute; the rest count together.
pub const MAX_ADDRESSES: usize = 100_000;
const WINDOW_MS: u64 = 60_000;

/// What an address is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    /// Every address past `MAX_ADDRESSES` in a minute.
    Overflow,
}

fn key_of(ip: IpAddr) -> Key {
    match ip {
        IpAddr::V4(_) => Key::Address(ip),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Key::Address(IpAddr::V4(v4)),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Key::Address(IpAddr::V6(prefix.into()))
            }
        },
    }
}

/// Counts per address over the current and the previous minute.
#[derive(Debug)]
pub struct AddressRates {
    per_minute: u32,
    /// Start of the current minute (ms, the caller's clock).
    window_start: u64,
    current: HashMap<Key, u32>,
    previous: HashMap<Key, u32>,
}

/// A refused request: when the address may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub retry_after_s: u64,
}

impl AddressRates {
    /// `per_minute` of 0 allows everything.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            window_start: 0,
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    /// Counts one request from `ip` at `now_ms`; refused when the address made `per_minute`
    /// requests in the last minute (the previous minute weighted by how much of it the sliding
    /// window still covers). Refused requests count too: a client that keeps trying stays out.
    pub fn check(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), RateLimited> {
        if self.per_minute == 0 {
            return Ok(());
        }
        self.roll(now_ms);
        let mut key = key_of(ip);
        if !self.current.contains_key(&key) && self.current.len() >= MAX_ADDRESSES {
            key = Key::Overflow;
        }
        let elapsed = now_ms.saturating_sub(self.window_start);
        let previous = f64::from(self.previous.get(&key).copied().unwrap_or(0));
        let count = self.current.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        let weighted = previous * (WINDOW_MS - elapsed.min(WINDOW_MS)) as f64 / WINDOW_MS as f64;
        if f64::from(*count) + weighted > f64::from(self.per_minute) {
            return Err(RateLimited {
                retry_after_s: (WINDOW_MS - elapsed.min(WINDOW_MS)).div_ceil(1000).max(1),
            });
        }
        Ok(())
    }

    /// Addresses counted now (both minutes), for tests and metrics.
    pub fn tracked(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    fn roll(&mut self, now_ms: u64) {
        if now_ms < self.window_start + WINDOW_MS {
            return;
        }
        let minutes = (now_ms - self.window_start) / WINDOW_MS;
        self.previous = if minutes == 1 {
            std::mem::take(&mut self.current)
        } else {
            self.current.clear();
            HashMap::new()
        };
        self.window_start += minutes * WINDOW_MS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn an_address_gets_its_allowance_per_minute_and_others_are_not_touched() {
        let mut rates = AddressRates::new(3);
        for _ in 0..3 {
            assert!(rates.check(ip("192.0.2.1"), 1_000).is_ok());
        }
        let refused = rates.check(ip("192.0.2.1"), 1_000).expect_err("over");
        assert_eq!(refused.retry_after_s, 59);
        assert!(rates.check(ip("192.0.2.2"), 1_000).is_ok());
        // Half a minute into the next minute, half of the last minute's 4 still count: 2 + 1 ok.
        assert!(rates.check(ip("192.0.2.1"), 90_000).is_ok());
        assert!(rates.check(ip("192.0.2.1"), 90_000).is_err());
        // Two minutes on, nothing of the past counts.
        for _ in 0..3 {
            assert!(rates.check(ip("192.0.2.1"), 300_000).is_ok());
        }
    }

    #[test]
    fn ipv6_counts_by_its_64_and_a_mapped_ipv4_as_the_ipv4() {
        let mut rates = AddressRates::new(2);
        assert!(rates.check(ip("2001:db8:1:2::1"), 0).is_ok());
        assert!(rates.check(ip("2001:db8:1:2:ffff::9"), 0).is_ok());
        assert!(rates.check(ip("2001:db8:1:2::77"), 0).is_err(), "same /64");
        assert!(rates.check(ip("2001:db8:1:3::1"), 0).is_ok());
        assert!(rates.check(ip("::ffff:192.0.2.7"), 0).is_ok());
        assert!(rates.check(ip("192.0.2.7"), 0).is_ok());
        assert!(rates.check(ip("192.0.2.7"), 0).is_err());
    }

    #[test]
    fn memory_is_bounded_and_zero_allows_everything() {
        let mut rates = AddressRates::new(1_000_000);
        for n in 0..(MAX_ADDRESSES as u32 + 500) {
            let _ = rates.check(IpAddr::V4(n.into()), 0);
        }
        assert_eq!(rates.tracked(), MAX_ADDRESSES + 1);
        let _ = rates.check(ip("192.0.2.1"), 200_000);
        assert_eq!(rates.tracked(), 1, "old minutes are dropped whole");
        let mut open = AddressRates::new(0);
        assert!((0..10_000).all(|_| open.check(ip("192.0.2.1"), 0).is_ok()));
    }
}
