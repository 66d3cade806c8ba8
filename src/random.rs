//! Randomness from the OS, for publish tokens, room epochs and node names.

/// A random value from the OS.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return fallback();
    }
    u64::from_le_bytes(bytes)
}

/// Without OS randomness: SplitMix64's mix of the clock, the process and a counter, so values
/// still differ across restarts and from call to call (connection IDs must not repeat).
fn fallback() -> u64 {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut z =
        crate::clock::unix_ms() ^ (u64::from(std::process::id()) << 40) ^ call.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A fresh publish token: 32 hex digits.
pub fn generate_token() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_os_randomness_values_still_differ_from_call_to_call() {
        // Within one millisecond the clock and the process are the same: the counter differs.
        let values: std::collections::HashSet<u64> = (0..10_000).map(|_| super::fallback()).collect();
        assert_eq!(values.len(), 10_000);
    }
}
