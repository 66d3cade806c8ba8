//! Picks the delta format by figures (issue 23): bytes and encode time of JSON Merge Patch
//! (RFC 7396), JSON Patch (RFC 6902, the `json-patch` crate's diff) and fossil deltas
//! (`courtside_core::delta`) on a 64-team bracket finished one match at a time, and on the
//! demo's game and league states. `cargo run --release -p courtside-bench --bin delta-formats`.

#[path = "../bracket.rs"]
mod bracket;

use std::collections::HashMap;
use std::time::Instant;

use std::sync::Arc;

use courtside::demo::simulator::{SaturdayConfig, SaturdayModel};
use courtside_core::{delta, JsonData, Kind, Now, Publication, RoomId, RoomName};
use serde_json::Value;

/// RFC 7396's patch from `a` to `b`: changed members, `null` for removed ones; anything that
/// is not an object on both sides (arrays included) is replaced whole.
fn merge_diff(a: &Value, b: &Value) -> Option<Value> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut patch = serde_json::Map::new();
            for (k, vb) in y {
                match x.get(k) {
                    Some(va) => {
                        if let Some(p) = merge_diff(va, vb) {
                            patch.insert(k.clone(), p);
                        }
                    }
                    None => {
                        patch.insert(k.clone(), vb.clone());
                    }
                }
            }
            for k in x.keys().filter(|k| !y.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        _ if a == b => None,
        _ => Some(b.clone()),
    }
}

#[derive(Default)]
struct Tally {
    n: u64,
    full: u64,
    bytes: [u64; 3],
    ns: [u128; 3],
    worst: [u64; 3],
}

impl Tally {
    fn add(&mut self, before: &str, after: &str, reps: u32) {
        self.n += 1;
        self.full += after.len() as u64;
        let t = Instant::now();
        let mut size = 0;
        for _ in 0..reps {
            let (a, b): (Value, Value) = (
                serde_json::from_str(before).unwrap_or_default(),
                serde_json::from_str(after).unwrap_or_default(),
            );
            size = merge_diff(&a, &b).map_or(0, |p| p.to_string().len());
        }
        self.record(0, size, t, reps);
        let t = Instant::now();
        for _ in 0..reps {
            let (a, b): (Value, Value) = (
                serde_json::from_str(before).unwrap_or_default(),
                serde_json::from_str(after).unwrap_or_default(),
            );
            size = serde_json::to_string(&json_patch::diff(&a, &b)).map_or(0, |s| s.len());
        }
        self.record(1, size, t, reps);
        let t = Instant::now();
        for _ in 0..reps {
            size = delta::create(before.as_bytes(), after.as_bytes()).len();
        }
        self.record(2, size, t, reps);
    }

    fn record(&mut self, i: usize, size: usize, t: Instant, reps: u32) {
        self.bytes[i] += size as u64;
        self.worst[i] = self.worst[i].max(size as u64);
        self.ns[i] += t.elapsed().as_nanos() / u128::from(reps);
    }

    fn print(&self, what: &str) {
        let n = self.n.max(1);
        println!("| {what} | {} | {} |", self.n, self.full / n);
        for (i, name) in ["merge patch (RFC 7396)", "JSON Patch (RFC 6902)", "fossil delta"]
            .iter()
            .enumerate()
        {
            println!(
                "|   {name} | mean {} B ({:.1} % of full), worst {} B | {:.1} µs |",
                self.bytes[i] / n,
                100.0 * self.bytes[i] as f64 / self.full.max(1) as f64,
                self.worst[i],
                self.ns[i] as f64 / n as f64 / 1000.0
            );
        }
    }
}

/// The messages as Courtside sends them for the same bracket series: the whole state and the
/// delta, as a WebSocket frame's payload and as a WebTransport stream message and datagram.
fn messages() {
    let room = RoomName::parse("bracket:12").expect("room");
    let now = Now {
        unix_ms: 1_700_000_000_000,
        instant: Instant::now(),
    };
    let mut b = bracket::Bracket::new(64);
    let state = |version: u64, text: &str, previous: Option<&Arc<Publication>>| {
        let data = JsonData::parse(text.as_bytes()).expect("json");
        Arc::new(
            Publication::new(RoomId(12), room.clone(), Kind::State, version, None, &data, now)
                .with_delta_base(previous),
        )
    };
    let mut previous = state(1, &b.to_json(), None);
    let (mut n, mut sums) = (0u64, [0u64; 6]);
    for m in 0..b.match_count() {
        for live in [true, false] {
            if live {
                b.score_next(30 + m as u32 % 20, 28 + m as u32 % 17);
            } else {
                b.advance(m % 5 == 0);
            }
            let next = state(previous.number() + 1, &b.to_json(), Some(&previous));
            let d = next.delta().expect("a delta");
            for (i, size) in [
                next.json_frame().len(),
                d.json_frame().len(),
                next.wire_message().len(),
                d.wire_message().len(),
                next.session0_datagram().len(),
                d.session0_datagram().len(),
            ]
            .into_iter()
            .enumerate()
            {
                sums[i] += size as u64;
            }
            n += 1;
            previous = next;
        }
    }
    println!();
    println!("The 64-team bracket's changes as Courtside sends them:");
    println!();
    println!("| as sent, mean of {n} changes | whole state | delta | delta / whole |");
    println!("|---|---|---|---|");
    for (i, what) in [
        "WebSocket frame payload",
        "WebTransport stream message",
        "WebTransport datagram (whole: too large for one)",
    ]
    .iter()
    .enumerate()
    {
        let (whole, delta) = (sums[2 * i] / n, sums[2 * i + 1] / n);
        println!(
            "| {what} | {whole} B | {delta} B | {:.1} % |",
            100.0 * delta as f64 / whole as f64
        );
    }
}

fn main() {
    let reps = 20;
    println!("| states | changes | mean full state, bytes |");
    println!("|---|---|---|");
    // A 64-team bracket: each match goes live with a score, then finishes and moves its winner on.
    let mut b = bracket::Bracket::new(64);
    let (mut scored, mut finished) = (Tally::default(), Tally::default());
    let mut before = b.to_json();
    for m in 0..b.match_count() {
        b.score_next(30 + m as u32 % 20, 28 + m as u32 % 17);
        let live = b.to_json();
        scored.add(&before, &live, reps);
        b.advance(m % 5 == 0);
        let done = b.to_json();
        finished.add(&live, &done, reps);
        before = done;
    }
    scored.print("64-team bracket, a match's score");
    finished.print("64-team bracket, a match finishes (winner moves on)");
    // The demo's own states: consecutive versions of each game and league room.
    let mut model = SaturdayModel::new(SaturdayConfig::default(), 7);
    let mut last: HashMap<String, String> = HashMap::new();
    let (mut games, mut leagues) = (Tally::default(), Tally::default());
    let mut out = Vec::new();
    for _ in 0..400 {
        out.clear();
        model.advance(1_000, &mut out);
        for p in &out {
            let room = p.room.as_str().to_string();
            if let Some(prev) = last.insert(room.clone(), p.data.clone()) {
                if room.starts_with("game:") && games.n < 2000 {
                    games.add(&prev, &p.data, 5);
                } else if room.starts_with("league:") && leagues.n < 2000 {
                    leagues.add(&prev, &p.data, 5);
                }
            }
        }
    }
    games.print("demo game score (`game:*`)");
    leagues.print("demo league (`league:*`)");
    messages();
}
