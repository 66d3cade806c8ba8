//! A backend publishing through one node (its "home", as a load balancer would pick), as
//! docs/openapi.yaml tells a backend to: half the publishes carry an `Idempotency-Key` and are
//! retried with it (through the next node) after no answer, 409 or 503; the others are sent
//! again only when nothing was published (the connection was refused, or 503/429).
//! Every attempt and the final answer are recorded for the checker.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::http::{request, Outcome};
use super::schedule::Rng;
use crate::util::TOKEN;

/// The base of the marker events' numbers (`n`), published after the faults.
pub const MARKER: u64 = 900_000_000;

#[derive(Clone, Debug)]
pub enum Fate {
    /// 200 or 202: the node took it.
    Accepted {
        status: u16,
        node: usize,
        at: Instant,
        body: Value,
    },
    /// Sent, never answered (or retried past the deadline): published at most once.
    Unknown,
    /// An answer that says nothing was published.
    Refused(String),
}

#[derive(Clone, Debug)]
pub struct Publish {
    pub publisher: usize,
    /// The number in the data (`{"n":N}` for events, `{"s":N}` for states).
    pub n: u64,
    pub room: usize,
    pub event: bool,
    pub keyed: bool,
    /// (node, ms since the start, what happened).
    pub attempts: Vec<(usize, u128, String)>,
    pub fate: Fate,
}

impl Publish {
    pub fn accepted_at(&self) -> Option<(u16, usize, Instant)> {
        match &self.fate {
            Fate::Accepted { status, node, at, .. } => Some((*status, *node, *at)),
            _ => None,
        }
    }
}

pub struct Publisher {
    pub index: usize,
    pub rooms: Vec<String>,
    pub nodes: Vec<SocketAddr>,
    pub seed: u64,
    pub start: Instant,
}

impl Publisher {
    /// Publishes until `until`, one request at a time.
    pub async fn run(self, until: Instant) -> Vec<Publish> {
        let mut rng = Rng::new(self.seed);
        let mut done = Vec::new();
        let mut count = 0;
        while Instant::now() < until {
            count += 1;
            let n = (self.index as u64 + 1) * 1_000_000 + count;
            let room = rng.below(self.rooms.len() as u64) as usize;
            let event = rng.chance(0.75);
            let keyed = rng.chance(0.5);
            done.push(self.publish(n, room, event, keyed).await);
            tokio::time::sleep(rng.millis(10, 50)).await;
        }
        done
    }

    async fn publish(&self, n: u64, room: usize, event: bool, keyed: bool) -> Publish {
        let (path, body) = if event {
            (format!("/v1/rooms/{}/events", self.rooms[room]), json!({ "n": n }))
        } else {
            (format!("/v1/rooms/{}/state", self.rooms[room]), json!({ "s": n }))
        };
        let key = format!("campaign-{:x}-{n}", self.seed);
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("authorization", auth.as_str())];
        if keyed {
            headers.push(("idempotency-key", key.as_str()));
        }
        let mut node = self.index;
        let mut attempts = Vec::new();
        let mut maybe_published = false;
        let give_up = Instant::now() + Duration::from_secs(8);
        let fate = loop {
            let outcome = request(self.nodes[node], "POST", &path, &headers, body.to_string().into()).await;
            let at = Instant::now();
            let ms = at.duration_since(self.start).as_millis();
            attempts.push((node, ms, format!("{outcome:?}")));
            let retry = match outcome {
                Outcome::Answer(status @ (200 | 202), body) => {
                    break Fate::Accepted { status, node, at, body };
                }
                Outcome::Answer(409, _) => {
                    maybe_published = true;
                    Duration::from_millis(100)
                }
                Outcome::Answer(429 | 503, _) => {
                    node = (node + 1) % self.nodes.len();
                    Duration::from_millis(100)
                }
                Outcome::Answer(status, body) => break Fate::Refused(format!("{status} {body}")),
                Outcome::NotSent => {
                    node = (node + 1) % self.nodes.len();
                    Duration::from_millis(50)
                }
                Outcome::NoAnswer if keyed => {
                    maybe_published = true;
                    node = (node + 1) % self.nodes.len();
                    Duration::from_millis(50)
                }
                Outcome::NoAnswer => break Fate::Unknown,
            };
            if Instant::now() + retry > give_up {
                break if maybe_published {
                    Fate::Unknown
                } else {
                    Fate::Refused("gave up".into())
                };
            }
            tokio::time::sleep(retry).await;
        };
        Publish {
            publisher: self.index,
            n,
            room,
            event,
            keyed,
            attempts,
            fate,
        }
    }
}
