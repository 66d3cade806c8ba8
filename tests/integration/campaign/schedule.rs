//! The seeded part of a schedule: a small PRNG (splitmix64) and the plan it draws, the rooms,
//! who subscribes to what, and the faults with their moments, so one seed replays one schedule.

use std::time::Duration;

/// splitmix64: tiny, seedable, good enough to draw schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// Uniform in `lo..hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// What the nemesis does to the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL node `i`, restart it on the same ports when the fault heals.
    KillNode(usize),
    /// SIGTERM node `i` (it drains), restart it when the fault heals.
    TermNode(usize),
    /// SIGKILL Redis, restart it when the fault heals: empty, or with its data (AOF, fsync always).
    KillRedis { empty: bool },
    /// Node `i`'s path to Redis (its proxy): open connections cut, new ones refused, for a while.
    CutNode(usize),
    /// Node `i`'s path to Redis goes silent (connections held, nothing forwarded), for a while.
    StallNode(usize),
    /// Room `r`'s slot moves to another master (Redis Cluster only).
    MoveSlot(usize),
}

impl FaultKind {
    /// The kind's name, as `COURTSIDE_CAMPAIGN_FAULTS` lists them.
    pub fn name(&self) -> &'static str {
        match self {
            Self::KillNode(_) => "kill-node",
            Self::TermNode(_) => "term-node",
            Self::KillRedis { empty: true } => "kill-redis-empty",
            Self::KillRedis { empty: false } => "kill-redis-data",
            Self::CutNode(_) => "cut-node",
            Self::StallNode(_) => "stall-node",
            Self::MoveSlot(_) => "move-slot",
        }
    }
}

/// One fault: applied at `at` after traffic starts, healed `lasts` later.
#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub at: Duration,
    pub lasts: Duration,
}

/// A whole schedule, drawn from one seed.
#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub rooms: Vec<String>,
    /// Per client: its first node and the rooms (indices) it subscribes to.
    pub clients: Vec<(usize, Vec<usize>)>,
    /// How long the publishers publish.
    pub traffic: Duration,
    pub faults: Vec<Fault>,
}

pub const NODES: usize = 3;

impl Plan {
    /// Draws a plan. `cluster`: the Redis Cluster variant (slot moves, no Redis kill or proxy);
    /// `allowed`: the fault kinds to draw from (by name; empty for all).
    pub fn draw(seed: u64, cluster: bool, allowed: &[String]) -> Self {
        let mut rng = Rng::new(seed);
        let rooms: Vec<String> = (0..4).map(|r| format!("camp:{seed:x}:{r}")).collect();
        // Two clients per node; each follows a random non-empty set of rooms. Every room has at
        // least one client, and room 0 one on every node.
        let mut clients = Vec::new();
        for node in 0..NODES {
            for _ in 0..2 {
                let mut set: Vec<usize> = (0..rooms.len()).filter(|_| rng.chance(0.6)).collect();
                if !set.contains(&0) && clients.len() % 2 == 0 {
                    set.insert(0, 0);
                }
                if set.is_empty() {
                    set.push(rng.below(rooms.len() as u64) as usize);
                }
                clients.push((node, set));
            }
        }
        for r in 0..rooms.len() {
            if !clients.iter().any(|(_, set)| set.contains(&r)) {
                let c = rng.below(clients.len() as u64) as usize;
                clients[c].1.push(r);
            }
        }
        let traffic = rng.millis(4000, 7000);
        let mut faults = Vec::new();
        let count = 1 + rng.below(3);
        let mut tries = 0;
        while (faults.len() as u64) < count && tries < 100 {
            tries += 1;
            let node = rng.below(NODES as u64) as usize;
            let kind = if cluster {
                match rng.below(4) {
                    0 => FaultKind::KillNode(node),
                    1 => FaultKind::TermNode(node),
                    _ => FaultKind::MoveSlot(rng.below(rooms.len() as u64) as usize),
                }
            } else {
                match rng.below(7) {
                    0 => FaultKind::KillNode(node),
                    1 => FaultKind::TermNode(node),
                    2 => FaultKind::KillRedis { empty: true },
                    3 => FaultKind::KillRedis { empty: false },
                    4 | 5 => FaultKind::CutNode(node),
                    _ => FaultKind::StallNode(node),
                }
            };
            if !allowed.is_empty() && !allowed.iter().any(|a| a == kind.name()) {
                continue;
            }
            let at = rng.millis(300, traffic.as_millis() as u64 - 500);
            let lasts = rng.millis(200, 2500);
            faults.push(Fault { kind, at, lasts });
        }
        faults.sort_by_key(|f| f.at);
        Self {
            seed,
            rooms,
            clients,
            traffic,
            faults,
        }
    }
}
