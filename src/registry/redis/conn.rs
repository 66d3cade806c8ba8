//! The two connections a node holds to Redis (commands, and pub/sub with its pushes), each to one
//! Redis or to a Redis Cluster (routed by key slot), behind one type.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, Value};
use tokio::sync::mpsc;

use super::settings::{cluster_seeds, with_resp3};

/// A command connection: one Redis, or a Redis Cluster (routed by key slot).
#[derive(Clone)]
pub(super) enum RedisConn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Connects the command connection and the pub/sub connection, whose pushes (messages,
/// subscribe confirmations, disconnections) go to `pushes`.
pub(super) async fn connect(
    url: &str,
    cluster: bool,
    pushes: mpsc::UnboundedSender<PushInfo>,
) -> redis::RedisResult<(RedisConn, RedisConn)> {
    if cluster {
        let seeds: Vec<String> = cluster_seeds(url).iter().map(|u| with_resp3(u)).collect();
        let builder = || {
            redis::cluster::ClusterClientBuilder::new(seeds.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(Duration::from_secs(2))
        };
        let commands = builder().build()?.get_async_connection().await?;
        let pubsub = builder().push_sender(pushes).build()?.get_async_connection().await?;
        return Ok((RedisConn::Cluster(commands), RedisConn::Cluster(pubsub)));
    }
    let client = redis::Client::open(with_resp3(url))?;
    let timeouts = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(2);
    let commands = client.get_connection_manager_with_config(timeouts.clone()).await?;
    let pubsub = client
        .get_connection_manager_with_config(timeouts.set_push_sender(pushes).set_automatic_resubscription())
        .await?;
    Ok((RedisConn::Single(commands), RedisConn::Single(pubsub)))
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Subscribes a room's channel: SUBSCRIBE, or SSUBSCRIBE (sharded) on a cluster; asked
    /// again once if it fails, as `probe` does (a stale reconnect error comes once).
    pub(super) async fn subscribe(&mut self, channel: String) -> redis::RedisResult<()> {
        if self.subscribe_once(channel.clone()).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(PROBE_AGAIN_AFTER).await;
        self.subscribe_once(channel).await
    }

    async fn subscribe_once(&mut self, channel: String) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => c.subscribe(channel).await,
            Self::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    pub(super) async fn unsubscribe(&mut self, channel: String) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => c.unsubscribe(channel).await,
            Self::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }

    /// A PING, asked twice if the first fails: after an outage a connection manager answers its
    /// last failed reconnect's error once (`Connection refused`) and only then reconnects, so a
    /// single probe would report Redis down for one more heartbeat although it answers.
    pub(super) async fn probe(&mut self) -> redis::RedisResult<()> {
        let ping = |mut conn: Self| async move { redis::cmd("PING").query_async::<Value>(&mut conn).await.map(drop) };
        if ping(self.clone()).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(PROBE_AGAIN_AFTER).await;
        ping(self.clone()).await
    }
}

/// How long a probe waits for the reconnect its failed first PING started.
const PROBE_AGAIN_AFTER: Duration = Duration::from_millis(100);
