//! Randomness from the OS, for publish tokens, room epochs and node names.

/// A random value from the OS.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock, which still differs across restarts.
        return crate::clock::unix_ms() ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(bytes)
}

/// A fresh publish token: 32 hex digits.
pub fn generate_token() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}
