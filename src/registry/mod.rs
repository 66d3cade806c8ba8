//! Where rooms are shared: the embedded registry (this node alone, the default) or Redis
//! (several nodes). The hub stays the local fan-out either way; the registry decides who numbers
//! a publish and how it reaches the other nodes.

pub mod envelope;
pub mod redis;

use std::sync::Arc;

use crate::core::{JsonData, Kind, RoomName};
use crate::hub::{Hub, HubError};

pub use self::redis::{RedisRegistry, RedisSettings};

/// The outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Numbered: the version or sequence, and the ingest time.
    Numbered { number: u64, ts_ms: u64 },
    /// Redis is unreachable: queued in the outbox, to be numbered when it returns. Local
    /// subscribers already received it with `provisional` as its number, when the node holds the room.
    Queued { provisional: Option<u64>, ts_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("redis is unreachable and the outbox is full ({0} messages waiting); retry later")]
    OutboxFull(usize),
}

/// Health of the registry, for `/health` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegistryStatus {
    /// `embedded` or `redis`.
    pub kind: &'static str,
    /// `ok`, or `degraded` while Redis is unreachable.
    pub status: &'static str,
    /// Publishes waiting for Redis.
    pub outbox: usize,
}

/// The registry in use: a cloneable handle.
#[derive(Debug, Clone)]
pub enum Registry {
    Embedded,
    Redis(Arc<RedisRegistry>),
}

impl Registry {
    /// Numbers a publish and delivers it to every subscriber, local and (with Redis) remote.
    pub async fn publish(
        &self,
        hub: &Hub,
        room: &RoomName,
        kind: Kind,
        data: &JsonData,
    ) -> Result<Published, RegistryError> {
        match self {
            Self::Embedded => {
                let receipt = hub.publish(room, kind, data, crate::clock::now())?;
                Ok(Published::Numbered {
                    number: receipt.number,
                    ts_ms: receipt.ts_ms,
                })
            }
            Self::Redis(redis) => redis.publish(room, kind, data).await,
        }
    }

    pub fn status(&self) -> RegistryStatus {
        match self {
            Self::Embedded => RegistryStatus {
                kind: "embedded",
                status: "ok",
                outbox: 0,
            },
            Self::Redis(redis) => redis.status(),
        }
    }

    pub fn redis(&self) -> Option<&Arc<RedisRegistry>> {
        match self {
            Self::Embedded => None,
            Self::Redis(redis) => Some(redis),
        }
    }
}
