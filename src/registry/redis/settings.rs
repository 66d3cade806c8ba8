//! What the Redis registry is built from: its settings from the configuration, and the URLs it
//! connects with (cluster seeds, RESP3 for pushes).

use std::time::Duration;

/// What the Redis registry needs, built from the configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub node_id: String,
    /// The node's HTTP address, shown by `GET /v1/nodes`.
    pub http: String,
    pub heartbeat: Duration,
    pub outbox_messages: usize,
    pub outbox_bytes: usize,
    /// How long publishes Redis numbered are kept to be sent again if Redis is lost (`outbox`).
    pub resend_window: Duration,
    pub history_len: usize,
    pub history_ttl: Duration,
    pub state_ttl: Duration,
    /// Redis Cluster: `url` lists seed nodes (comma-separated); rooms use sharded pub/sub.
    pub cluster: bool,
}

impl RedisSettings {
    /// The settings of `--redis URL`; `http` is this node's bound HTTP address.
    pub fn from_config(config: &crate::config::ServeConfig, url: &str, http: std::net::SocketAddr) -> Self {
        let node_id = config.cluster.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            let host = if host.is_empty() { "node".to_string() } else { host };
            format!("{host}-{:06x}", crate::random::random_u64() & 0xff_ffff)
        });
        Self {
            url: url.to_string(),
            node_id,
            http: http.to_string(),
            heartbeat: config.cluster.node_heartbeat,
            outbox_messages: config.cluster.outbox_messages,
            outbox_bytes: config.cluster.outbox_bytes,
            resend_window: config.cluster.resend_window,
            history_len: config.rooms.history_size,
            history_ttl: config.rooms.history_ttl,
            state_ttl: config.rooms.state_ttl,
            cluster: config.cluster.redis_cluster,
        }
    }

    /// How long a room Redis lost settles after its first holder put it back, before anything is
    /// numbered anew in it: two heartbeats, for every holder to resync and put back what it knows
    /// (nodes probe Redis every 0.5 s at most while it is away).
    pub(super) fn settle(&self) -> std::time::Duration {
        self.heartbeat * 2
    }

    /// The TTL of a room's meta hash, in whole seconds (at least 1).
    pub(super) fn state_ttl_s(&self) -> u64 {
        self.state_ttl.as_secs().max(1)
    }
}

/// The Redis Cluster seed list of `--redis`: comma-separated URLs, where a seed written as bare
/// `host:port` takes the scheme and credentials of the first full URL (`redis://` without one),
/// so `rediss://:TOKEN@h1:6379,h2:6379` and `127.0.0.1:7000,127.0.0.1:7001` both work.
pub(super) fn cluster_seeds(list: &str) -> Vec<String> {
    let seeds: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let prefix = seeds
        .iter()
        .find_map(|seed| {
            let (scheme, rest) = seed.split_once("://")?;
            let userinfo = rest
                .split_once('@')
                .map_or(String::new(), |(user, _)| format!("{user}@"));
            Some(format!("{scheme}://{userinfo}"))
        })
        .unwrap_or_else(|| "redis://".to_string());
    seeds
        .iter()
        .map(|seed| {
            if seed.contains("://") {
                seed.to_string()
            } else {
                format!("{prefix}{seed}")
            }
        })
        .collect()
}

/// The URL with `protocol=resp3` (needed for pushes) added to its query, before any fragment.
pub(super) fn with_resp3(url: &str) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((base, fragment)) => (base, format!("#{fragment}")),
        None => (url, String::new()),
    };
    if base.contains("protocol=") {
        url.to_string()
    } else if base.contains('?') {
        format!("{base}&protocol=resp3{fragment}")
    } else {
        format!("{base}?protocol=resp3{fragment}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_seeds_may_be_bare_host_ports_after_the_first_url() {
        assert_eq!(
            cluster_seeds("127.0.0.1:7000, 127.0.0.1:7001"),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(
            cluster_seeds("rediss://:t@h1:6379,h2:6379,redis://h3:6379"),
            ["rediss://:t@h1:6379", "rediss://:t@h2:6379", "redis://h3:6379"]
        );
        assert_eq!(cluster_seeds("redis://h1:1,"), ["redis://h1:1"]);
    }

    #[test]
    fn resp3_is_asked_for_in_the_query_before_any_fragment() {
        assert_eq!(with_resp3("redis://h:6379"), "redis://h:6379?protocol=resp3");
        assert_eq!(
            with_resp3("redis://h:6379/0?x=1"),
            "redis://h:6379/0?x=1&protocol=resp3"
        );
        assert_eq!(
            with_resp3("rediss://:t@h:6379/#insecure"),
            "rediss://:t@h:6379/?protocol=resp3#insecure"
        );
        assert_eq!(with_resp3("redis://h?protocol=resp3"), "redis://h?protocol=resp3");
    }
}
