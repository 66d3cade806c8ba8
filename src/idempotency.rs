//! Safe retries for publishers (`Idempotency-Key`, draft-ietf-httpapi-idempotency-key-header):
//! the key, the request's fingerprint, and the record of the first answer, which the registry
//! keeps for the window (in memory here, in Redis across nodes) so a repeat publishes nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use courtside_codecs::publish::{BadKey, IdempotencyKey, MAX_KEY_LEN};

/// A claim not yet answered expires after this (or the window, if shorter): a node that died
/// mid-publish does not block the key for the whole window.
pub const PENDING_TTL: Duration = Duration::from_secs(30);

/// Keys the in-memory store holds at most; beyond, idempotent publishes are refused until
/// keys expire (a store that forgot keys early would publish retries twice).
pub const MAX_LOCAL_KEYS: usize = 100_000;

/// What identifies a request's content: SHA-256 over its parts, hex.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The first answer to a key: its request's fingerprint, status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub fingerprint: String,
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// `fingerprint \n status \n body`, as the Redis store keeps it.
    pub fn encode(&self) -> String {
        format!("{}\n{}\n{}", self.fingerprint, self.status, self.body)
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, '\n');
        let fingerprint = parts.next()?.to_string();
        let status = parts.next()?.parse().ok()?;
        let body = parts.next()?.to_string();
        Some(Self {
            fingerprint,
            status,
            body,
        })
    }
}

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is new: the caller publishes, then records its answer (or releases the key).
    Claimed,
    /// A request with this key is under way (its fingerprint).
    InProgress { fingerprint: String },
    /// The key was answered: this is the answer.
    Answered(Answer),
    /// The store holds as many keys as it may.
    Full,
}

impl Claim {
    /// What a request with `fingerprint` does about what its key holds.
    pub fn verdict(self, fingerprint: &str) -> Verdict {
        match self {
            Self::Claimed => Verdict::Publish,
            Self::Full => Verdict::Refuse(KeyRefusal::StoreFull),
            Self::InProgress { fingerprint: first } if first == fingerprint => Verdict::Refuse(KeyRefusal::InProgress),
            Self::Answered(answer) if answer.fingerprint == fingerprint => Verdict::Replay(answer),
            Self::InProgress { .. } | Self::Answered(_) => Verdict::Refuse(KeyRefusal::Reused),
        }
    }
}

/// What a keyed request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Publish, then record the answer (or release the key if the publish failed).
    Publish,
    /// Give the first answer again; publish nothing.
    Replay(Answer),
    Refuse(KeyRefusal),
}

/// Why a keyed request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// The same request is still being answered.
    InProgress,
    /// The key was used with another request.
    Reused,
    /// The store holds as many keys as it may.
    StoreFull,
}

#[derive(Debug)]
enum Entry {
    Pending { fingerprint: String },
    Done(Answer),
}

/// The keys of this node alone (the embedded registry's store).
#[derive(Debug, Default)]
pub struct LocalKeys {
    keys: Mutex<HashMap<IdempotencyKey, (Instant, Entry)>>,
}

impl LocalKeys {
    /// Claims `key` for `window` from `now`, or says what it holds.
    pub fn claim(&self, key: &IdempotencyKey, fingerprint: &str, window: Duration, now: Instant) -> Claim {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((expires, entry)) = keys.get(key) {
            if *expires > now {
                return match entry {
                    Entry::Pending { fingerprint } => Claim::InProgress {
                        fingerprint: fingerprint.clone(),
                    },
                    Entry::Done(answer) => Claim::Answered(answer.clone()),
                };
            }
        }
        if keys.len() >= MAX_LOCAL_KEYS {
            keys.retain(|_, (expires, _)| *expires > now);
            if keys.len() >= MAX_LOCAL_KEYS {
                return Claim::Full;
            }
        }
        let pending = Entry::Pending {
            fingerprint: fingerprint.to_string(),
        };
        keys.insert(key.clone(), (now + window.min(PENDING_TTL), pending));
        Claim::Claimed
    }

    /// Records the answer to a claimed key, kept for `window` from `now`.
    pub fn answer(&self, key: &IdempotencyKey, answer: Answer, window: Duration, now: Instant) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.insert(key.clone(), (now + window, Entry::Done(answer)));
    }

    /// Forgets a claimed key (its publish failed: a retry may try again).
    pub fn release(&self, key: &IdempotencyKey) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_requests_apart_and_parts_cannot_be_shifted() {
        assert_eq!(fingerprint(&[b"a", b"bc"]), fingerprint(&[b"a", b"bc"]));
        assert_ne!(fingerprint(&[b"a", b"bc"]), fingerprint(&[b"ab", b"c"]));
        assert_eq!(fingerprint(&[b""]).len(), 64);
    }

    #[test]
    fn answers_round_trip_with_newlines_in_the_body() {
        let answer = Answer {
            fingerprint: "f".into(),
            status: 202,
            body: "{\"a\":\n1}".into(),
        };
        assert_eq!(Answer::decode(&answer.encode()), Some(answer));
        assert_eq!(Answer::decode("f\nnot-a-status\n"), None);
    }

    #[test]
    fn a_claim_is_judged_by_the_request_fingerprint() {
        let answer = Answer {
            fingerprint: "f".into(),
            status: 200,
            body: "{}".into(),
        };
        assert_eq!(Claim::Claimed.verdict("f"), Verdict::Publish);
        assert_eq!(
            Claim::Answered(answer.clone()).verdict("f"),
            Verdict::Replay(answer.clone())
        );
        assert_eq!(
            Claim::Answered(answer).verdict("g"),
            Verdict::Refuse(KeyRefusal::Reused)
        );
        let pending = || Claim::InProgress {
            fingerprint: "f".into(),
        };
        assert_eq!(pending().verdict("f"), Verdict::Refuse(KeyRefusal::InProgress));
        assert_eq!(pending().verdict("g"), Verdict::Refuse(KeyRefusal::Reused));
        assert_eq!(Claim::Full.verdict("f"), Verdict::Refuse(KeyRefusal::StoreFull));
    }

    #[test]
    fn a_key_is_claimed_once_answered_then_replayed_until_the_window_ends() {
        let store = LocalKeys::default();
        let key = IdempotencyKey::parse(b"k").expect("key");
        let (t0, window) = (Instant::now(), Duration::from_secs(60));
        assert_eq!(store.claim(&key, "f1", window, t0), Claim::Claimed);
        assert_eq!(
            store.claim(&key, "f1", window, t0),
            Claim::InProgress {
                fingerprint: "f1".into()
            }
        );
        let answer = Answer {
            fingerprint: "f1".into(),
            status: 200,
            body: "{}".into(),
        };
        store.answer(&key, answer.clone(), window, t0);
        assert_eq!(
            store.claim(&key, "f2", window, t0 + window / 2),
            Claim::Answered(answer)
        );
        assert_eq!(store.claim(&key, "f2", window, t0 + window), Claim::Claimed, "expired");
        assert_eq!(
            store.claim(&key, "f2", window, t0 + window + PENDING_TTL),
            Claim::Claimed,
            "an unanswered claim expires sooner"
        );
        store.release(&key);
        assert_eq!(store.claim(&key, "f3", window, t0), Claim::Claimed);
    }
}
