//! The scenarios as plans for the load engine: who joins which rooms over which transport, and
//! what is published when. Pure and seeded, so both servers get exactly the same load.

use std::collections::HashMap;
use std::time::Duration;

use courtside::demo::simulator::{SaturdayConfig, SaturdayModel, SimRng};

use crate::clients::{Kind, Transport};
use crate::load::{ClientPlan, Planned, Workload};

/// How clients are spread: the share on WebTransport (Courtside only) and the number of nodes.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub webtransport_share: f64,
    pub nodes: usize,
}

impl Mix {
    /// Client `i`'s transport and node: WebTransport spread evenly at the share, nodes
    /// round-robin.
    fn place(&self, i: usize) -> (Transport, usize) {
        let share = self.webtransport_share;
        let transport = if ((i + 1) as f64 * share).floor() > (i as f64 * share).floor() {
            Transport::WebTransport
        } else {
            Transport::WebSocket
        };
        (transport, i % self.nodes.max(1))
    }
}

/// `fanout`: one room, `clients` subscribers, `messages` events (or states) at `rate` per second.
pub fn fanout(clients: usize, messages: usize, rate: f64, payload_bytes: usize, kind: Kind, mix: Mix) -> Workload {
    let payload = serde_json::to_string(&"x".repeat(payload_bytes)).unwrap_or_default();
    let gap = Duration::from_secs_f64(1.0 / rate.max(0.001));
    Workload {
        rooms: vec!["bench:fanout".into()],
        clients: (0..clients)
            .map(|i| {
                let (transport, node) = mix.place(i);
                ClientPlan {
                    rooms: vec![0],
                    transport,
                    node,
                }
            })
            .collect(),
        publishes: (0..messages)
            .map(|i| Planned {
                at: gap * i as u32,
                room: 0,
                kind,
                payload: payload.clone(),
            })
            .collect(),
        connect_over: None,
        sample_rss_every: None,
    }
}

/// The knobs of the Saturday model.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SaturdayParams {
    pub fans: usize,
    pub seconds: f64,
    /// Game time runs this many times faster than real time (more publishes per second).
    pub speed: f64,
    /// Every this many seconds, a notification goes to every league room at once (a burst).
    pub burst_every_seconds: f64,
    pub seed: u64,
}

/// `saturday`: the library's simulator (80 leagues, 3,500 teams, 400 games at once). Each fan
/// follows one game, its league and its bracket; games are picked with Zipf-skewed popularity
/// (a few games draw most fans). Publishes are what the simulator produces as game time runs at
/// `speed`, plus a burst to every league room every `burst_every_seconds`.
pub fn saturday(params: &SaturdayParams, mix: Mix) -> Workload {
    let mut model = SaturdayModel::new(SaturdayConfig::default(), params.seed);
    let mut rooms: Vec<String> = Vec::new();
    let mut index: HashMap<String, u32> = HashMap::new();
    let mut room_id = |name: &str, rooms: &mut Vec<String>| -> u32 {
        *index.entry(name.to_string()).or_insert_with(|| {
            rooms.push(name.to_string());
            (rooms.len() - 1) as u32
        })
    };
    let games = model.game_rooms();
    let leagues = model.league_rooms();
    // Zipf(1) over the games: weight 1/(rank+1), sampled by the cumulative weights.
    let cumulative: Vec<f64> = games
        .iter()
        .enumerate()
        .scan(0.0, |sum, (rank, _)| {
            *sum += 1.0 / (rank as f64 + 1.0);
            Some(*sum)
        })
        .collect();
    let total_weight = cumulative.last().copied().unwrap_or(1.0);
    let mut rng = SimRng::new(params.seed ^ 0x5eed);
    let mut clients = Vec::with_capacity(params.fans);
    for i in 0..params.fans {
        let pick = rng.unit() * total_weight;
        let g = cumulative
            .partition_point(|c| *c < pick)
            .min(games.len().saturating_sub(1));
        let game = &games[g];
        let league = model.league_of_game(game).unwrap_or_else(|| leagues[0].clone());
        let bracket = league.replacen("league:", "bracket:", 1);
        let (transport, node) = mix.place(i);
        clients.push(ClientPlan {
            rooms: vec![
                room_id(game, &mut rooms),
                room_id(&league, &mut rooms),
                room_id(&bracket, &mut rooms),
            ],
            transport,
            node,
        });
    }

    let step = Duration::from_millis(100);
    let steps = (params.seconds / step.as_secs_f64()).ceil() as u32;
    let burst_every = (params.burst_every_seconds / step.as_secs_f64()).round().max(1.0) as u32;
    let mut publishes = Vec::new();
    let mut out = Vec::new();
    for s in 0..steps {
        let at = step * s;
        out.clear();
        model.advance((step.as_secs_f64() * 1000.0 * params.speed) as u64, &mut out);
        for p in out.drain(..) {
            publishes.push(Planned {
                at,
                room: room_id(p.room.as_str(), &mut rooms),
                kind: p.kind,
                payload: p.data,
            });
        }
        if s > 0 && s % burst_every == 0 {
            for league in &leagues {
                publishes.push(Planned {
                    at,
                    room: room_id(league, &mut rooms),
                    kind: Kind::Event,
                    payload: r#"{"notice":"schedule update: all courts"}"#.into(),
                });
            }
        }
    }
    Workload {
        rooms,
        clients,
        publishes,
        connect_over: None,
        sample_rss_every: None,
    }
}

/// `connect-storm`: `clients` clients connect within `within`, all to one room; then `messages`
/// events check that every one of them is live.
pub fn connect_storm(clients: usize, within: Duration, messages: usize, mix: Mix) -> Workload {
    let mut workload = fanout(clients, messages, 10.0, 60, Kind::Event, mix);
    workload.connect_over = Some(within);
    workload
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_places_the_share_on_webtransport_and_nodes_round_robin() {
        let mix = Mix {
            webtransport_share: 0.7,
            nodes: 3,
        };
        let wt = (0..1000).filter(|i| mix.place(*i).0 == Transport::WebTransport).count();
        assert_eq!(wt, 700);
        let first_ten = (0..10).filter(|i| mix.place(*i).0 == Transport::WebTransport).count();
        assert_eq!(first_ten, 7);
        assert_eq!((0..6).map(|i| mix.place(i).1).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn saturday_fans_follow_a_game_its_league_and_its_bracket_with_skew() {
        let params = SaturdayParams {
            fans: 2000,
            seconds: 5.0,
            speed: 10.0,
            burst_every_seconds: 2.0,
            seed: 7,
        };
        let w = saturday(
            &params,
            Mix {
                webtransport_share: 0.0,
                nodes: 1,
            },
        );
        assert!(w.clients.iter().all(|c| c.rooms.len() == 3));
        for c in &w.clients {
            let names: Vec<&str> = c.rooms.iter().map(|r| w.rooms[*r as usize].as_str()).collect();
            assert!(
                names[0].starts_with("game:") && names[1].starts_with("league:"),
                "{names:?}"
            );
            assert_eq!(names[1].replacen("league:", "bracket:", 1), names[2]);
        }
        // Skew: the most popular game has far more fans than the average game.
        let mut per_game: HashMap<u32, usize> = HashMap::new();
        for c in &w.clients {
            *per_game.entry(c.rooms[0]).or_default() += 1;
        }
        let max = per_game.values().copied().max().unwrap_or(0);
        assert!(max > 10 * (2000 / 400), "max {max}");
        // Publishes are in time order, include states and events, and bursts hit every league.
        assert!(w.publishes.windows(2).all(|p| p[0].at <= p[1].at));
        assert!(w.publishes.iter().any(|p| p.kind == Kind::State));
        let burst = w
            .publishes
            .iter()
            .filter(|p| p.payload.contains("schedule update"))
            .count();
        assert_eq!(burst, 2 * 80);
    }
}
