//! Publishers' idempotency keys across every node: one Redis key each, claimed by `SET NX` while
//! the publish runs and then holding its first answer for the window.

use std::time::Duration;

use redis::AsyncCommands;

use super::RedisRegistry;
use crate::idempotency::{Answer, Claim, IdempotencyKey};

/// A publisher's idempotency key in Redis (one key each, any slot).
fn idempotency_key(key: &IdempotencyKey) -> String {
    format!("cs:idem:{}", key.as_str())
}

/// How a key's record starts: claimed by a publish under way, or answered (then the answer).
const KEY_PENDING: &str = "pending\n";
const KEY_ANSWERED: &str = "answered\n";

impl RedisRegistry {
    /// `SET NX` claims the key across every node; a key already there is read back.
    pub(super) async fn claim_key_shared(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
        window: Duration,
    ) -> redis::RedisResult<Claim> {
        let mut conn = self.commands.clone();
        let name = idempotency_key(key);
        let set: Option<String> = redis::cmd("SET")
            .arg(&name)
            .arg(format!("{KEY_PENDING}{fingerprint}"))
            .arg("NX")
            .arg("PX")
            .arg(window.min(crate::idempotency::PENDING_TTL).as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            return Ok(Claim::Claimed);
        }
        let record: Option<String> = conn.get(&name).await?;
        Ok(match record {
            // Expired between the two commands: claim it again.
            None => return Box::pin(self.claim_key_shared(key, fingerprint, window)).await,
            Some(record) => match record.strip_prefix(KEY_ANSWERED).and_then(Answer::decode) {
                Some(answer) => Claim::Answered(answer),
                None => Claim::InProgress {
                    fingerprint: record.strip_prefix(KEY_PENDING).unwrap_or_default().to_string(),
                },
            },
        })
    }

    /// Records the first answer to a claimed key for the window.
    pub(super) async fn answer_key_shared(
        &self,
        key: &IdempotencyKey,
        answer: &Answer,
        window: Duration,
    ) -> redis::RedisResult<()> {
        let mut conn = self.commands.clone();
        redis::cmd("SET")
            .arg(idempotency_key(key))
            .arg(format!("{KEY_ANSWERED}{}", answer.encode()))
            .arg("PX")
            .arg(window.as_millis() as u64)
            .query_async(&mut conn)
            .await
    }

    /// Forgets a claimed key whose publish failed.
    pub(super) async fn release_key_shared(&self, key: &IdempotencyKey) {
        let mut conn = self.commands.clone();
        let _: Result<(), _> = conn.del(idempotency_key(key)).await;
    }
}
