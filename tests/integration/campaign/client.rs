//! A WebSocket client that follows docs/PROTOCOL.md to the letter and records what it took:
//! every subscribe numbered, epoch/`version`/`seq` kept per room as "After each `subscribed`"
//! says, notices followed, `recovered:false` refetched over HTTP, events dropped by `seq` and
//! by `id`, and after any close a reconnect (0–0.5 s after a restart, else backoff with jitter)
//! through the next node, resubscribing with `since` and the epoch.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::schedule::Rng;

/// One event a client took (its `id` was new to it).
#[derive(Clone, Debug)]
pub struct Taken {
    /// The publisher's number in the event's data.
    pub n: u64,
    pub id: String,
    pub seq: u64,
    pub epoch: String,
    /// Over the connection, or from the HTTP refetch after `recovered:false`.
    pub refetched: bool,
}

/// What a client holds for one room.
#[derive(Debug, Default)]
pub struct RoomView {
    pub epoch: String,
    pub version: u64,
    pub seq: u64,
    pub ids: HashSet<String>,
    pub taken: Vec<Taken>,
    /// The data of the state applied last.
    pub state: Option<Value>,
    /// A reply to a subscribe of this connection arrived.
    pub live: bool,
    /// `recovered:false` whose refetch could not cover the events missed (410, a trimmed or
    /// emptied history): the docs' one allowance to miss events, with when and why.
    pub gaps: Vec<(Instant, String)>,
    /// What the docs say the server never does (an event twice on a connection, a `seq` skipped).
    pub anomalies: Vec<String>,
}

#[derive(Debug, Default)]
pub struct ClientView {
    pub rooms: HashMap<usize, RoomView>,
    /// What happened to it, for the failure report (bounded).
    pub journal: Vec<String>,
    pub node: Option<usize>,
}

impl ClientView {
    fn note(&mut self, text: String) {
        if self.journal.len() < 400 {
            self.journal.push(text);
        }
    }
}

pub struct ContractClient {
    pub index: usize,
    pub rooms: Vec<usize>,
    pub view: Arc<Mutex<ClientView>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ContractClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a connection ended, for the reconnect delay.
enum End {
    /// `reconnect`, close 1012 or error 107: a server restart.
    Restart,
    Other(String),
}

struct Ctx {
    index: usize,
    rooms: Vec<(usize, String)>,
    nodes: Vec<SocketAddr>,
    view: Arc<Mutex<ClientView>>,
    bump: watch::Sender<u64>,
    epoch0: Instant,
}

impl ContractClient {
    pub fn start(
        index: usize,
        rooms: Vec<(usize, String)>,
        nodes: Vec<SocketAddr>,
        first: usize,
        seed: u64,
        bump: watch::Sender<u64>,
        epoch0: Instant,
    ) -> Self {
        let view = Arc::new(Mutex::new(ClientView::default()));
        let ctx = Ctx {
            index,
            rooms: rooms.clone(),
            nodes,
            view: view.clone(),
            bump,
            epoch0,
        };
        let task = tokio::spawn(run(ctx, first, seed));
        Self {
            index,
            rooms: rooms.iter().map(|(r, _)| *r).collect(),
            view,
            task,
        }
    }

    /// Stops the client (its view stays as it is).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Subscribed (a reply came) to every room on a live connection.
    pub fn settled(&self) -> bool {
        let view = self.view.lock().expect("view");
        self.rooms.iter().all(|r| view.rooms.get(r).is_some_and(|v| v.live))
    }
}

async fn run(ctx: Ctx, first: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut node = first;
    let mut backoff = Duration::from_millis(500);
    let mut request = 0u64;
    loop {
        let url = format!("ws://{}/ws", ctx.nodes[node]);
        let connected = tokio::time::timeout(Duration::from_secs(3), tokio_tungstenite::connect_async(url)).await;
        let end = match connected {
            Ok(Ok((ws, _))) => {
                ctx.note(format!("connected to node {node}"));
                ctx.view.lock().expect("view").node = Some(node);
                let end = session(&ctx, ws, node, &mut request, &mut backoff).await;
                let mut view = ctx.view.lock().expect("view");
                view.node = None;
                for room in view.rooms.values_mut() {
                    room.live = false;
                }
                drop(view);
                ctx.bump.send_modify(|c| *c += 1);
                end
            }
            _ => End::Other(format!("could not connect to node {node}")),
        };
        // PROTOCOL.md, "Writing a client", 3.
        let delay = match end {
            End::Restart => {
                ctx.note(format!("node {node} restarts: reconnect"));
                rng.millis(0, 500)
            }
            End::Other(why) => {
                ctx.note(why);
                let factor = 0.5 + rng.below(1000) as f64 / 1000.0;
                let delay = backoff.mul_f64(factor);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                delay
            }
        };
        tokio::time::sleep(delay).await;
        // The load balancer sends it to another node.
        node = (node + 1) % ctx.nodes.len();
    }
}

impl Ctx {
    fn note(&self, text: String) {
        let at = self.epoch0.elapsed().as_millis();
        self.view
            .lock()
            .expect("view")
            .note(format!("{at:>6} ms client {}: {text}", self.index));
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn session(ctx: &Ctx, mut ws: Ws, node: usize, request: &mut u64, backoff: &mut Duration) -> End {
    // Per subscribe id: the room and the `since` it carried.
    let mut pending: HashMap<u64, (usize, Option<u64>)> = HashMap::new();
    let mut on_connection: HashMap<usize, HashSet<String>> = HashMap::new();
    for (room, name) in &ctx.rooms {
        *request += 1;
        let mut command = json!({"type": "subscribe", "room": name, "id": *request});
        let mut since = None;
        {
            let view = ctx.view.lock().expect("view");
            if let Some(held) = view.rooms.get(room).filter(|v| !v.epoch.is_empty()) {
                command["since"] = json!(held.seq);
                command["epoch"] = json!(held.epoch);
                since = Some(held.seq);
            }
        }
        pending.insert(*request, (*room, since));
        if ws.send(Message::text(command.to_string())).await.is_err() {
            return End::Other("send failed".into());
        }
    }
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(90), ws.next()).await {
            Err(_) => return End::Other("silent for 90 s".into()),
            Ok(None) | Ok(Some(Err(_))) => return End::Other(format!("node {node}: connection ended")),
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map(|f| u16::from(f.code));
                return if code == Some(1012) {
                    End::Restart
                } else {
                    End::Other(format!("node {node}: closed {code:?}"))
                };
            }
            Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<Value>(&text) {
                Ok(frame) => frame,
                Err(_) => return End::Other(format!("not JSON: {text}")),
            },
            Ok(Some(Ok(_))) => continue,
        };
        let Some(room) = frame["room"]
            .as_str()
            .and_then(|name| ctx.rooms.iter().find(|(_, n)| n == name).map(|(r, _)| *r))
        else {
            match frame["type"].as_str() {
                Some("reconnect") => {}
                Some("error") if frame["code"] == 107 => {}
                _ => ctx.note(format!("node {node}: {frame}")),
            }
            continue;
        };
        match frame["type"].as_str() {
            Some("subscribed") => {
                let reply = frame["id"].as_u64().and_then(|id| pending.remove(&id));
                let refetch = match reply {
                    Some((_, since)) => on_reply(ctx, room, since, &frame),
                    None => on_notice(ctx, room, &frame),
                };
                if pending.is_empty() {
                    *backoff = Duration::from_millis(500);
                }
                if let Some(since) = refetch {
                    refetch_history(ctx, node, room, since, &frame).await;
                }
            }
            Some("event") => {
                let id = frame["id"].as_str().unwrap_or_default().to_string();
                let twice = !on_connection.entry(room).or_default().insert(id.clone());
                on_event(ctx, room, &frame, twice);
            }
            Some("state") => {
                let version = frame["version"].as_u64().unwrap_or(0);
                let mut view = ctx.view.lock().expect("view");
                let held = view.rooms.entry(room).or_default();
                if version > held.version {
                    held.version = version;
                    held.state = Some(frame["data"].clone());
                }
            }
            Some("error") if frame["code"] == 107 => {}
            _ => ctx.note(format!("node {node}: {frame}")),
        }
        ctx.bump.send_modify(|c| *c += 1);
    }
}

/// The reply to one of our subscribes; returns the `since` to refetch from after `recovered:false`.
fn on_reply(ctx: &Ctx, room: usize, since: Option<u64>, frame: &Value) -> Option<u64> {
    let epoch = frame["epoch"].as_str().unwrap_or_default().to_string();
    let seq = frame["seq"].as_u64().unwrap_or(0);
    let recovered = frame["recovered"] == true;
    let mut view = ctx.view.lock().expect("view");
    let held = view.rooms.entry(room).or_default();
    let same_epoch = held.epoch == epoch;
    let refetch = match since {
        None => {
            held.version = 0;
            held.seq = seq;
            None
        }
        Some(since) if recovered => {
            if !same_epoch {
                held.version = 0;
            }
            held.seq = since;
            None
        }
        Some(since) => {
            held.version = 0;
            held.seq = seq;
            Some(if same_epoch { since } else { 0 })
        }
    };
    held.epoch = epoch;
    held.live = true;
    drop(view);
    if since.is_some() {
        ctx.note(format!("room {room}: reply since {since:?}: {frame}"));
    }
    refetch
}

/// An unrequested `subscribed`; returns the `since` to refetch from when it says `recovered:false`.
fn on_notice(ctx: &Ctx, room: usize, frame: &Value) -> Option<u64> {
    let mut view = ctx.view.lock().expect("view");
    let held = view.rooms.entry(room).or_default();
    held.epoch = frame["epoch"].as_str().unwrap_or_default().to_string();
    held.version = frame["version"].as_u64().unwrap_or(0);
    held.seq = frame["seq"].as_u64().unwrap_or(0);
    drop(view);
    ctx.note(format!("room {room}: notice {frame}"));
    (frame["recovered"] == false).then_some(0)
}

fn on_event(ctx: &Ctx, room: usize, frame: &Value, twice_on_connection: bool) {
    let seq = frame["seq"].as_u64().unwrap_or(0);
    let id = frame["id"].as_str().unwrap_or_default().to_string();
    let mut view = ctx.view.lock().expect("view");
    let held = view.rooms.entry(room).or_default();
    if twice_on_connection {
        held.anomalies
            .push(format!("the same event twice on one connection: {frame}"));
    }
    if seq <= held.seq {
        held.anomalies.push(format!(
            "an event whose seq is not above the {} held (dropped, as the docs say): {frame}",
            held.seq
        ));
        return;
    }
    if seq > held.seq + 1 {
        held.anomalies.push(format!("seq skipped after {}: {frame}", held.seq));
    }
    held.seq = seq;
    if held.ids.insert(id.clone()) {
        let n = frame["data"]["n"].as_u64().unwrap_or(0);
        let epoch = held.epoch.clone();
        held.taken.push(Taken {
            n,
            id,
            seq,
            epoch,
            refetched: false,
        });
    }
}

/// "After each `subscribed`", `recovered:false`: what the history still keeps, page by page,
/// taking the events whose `id` it does not hold, in `seq` order. Records a gap when it cannot
/// cover `since + 1 ..= seq` of the reply (410, a trimmed or emptied history, another epoch).
async fn refetch_history(ctx: &Ctx, node: usize, room: usize, since: u64, frame: &Value) {
    let name = &ctx.rooms.iter().find(|(r, _)| *r == room).expect("room").1;
    let epoch = frame["epoch"].as_str().unwrap_or_default().to_string();
    let upto = frame["seq"].as_u64().unwrap_or(0);
    let mut from = since;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut why = None;
    loop {
        let path = format!("/v1/rooms/{name}/events?since={from}");
        // A node that cannot reach Redis answers 503: the history is not gone, ask again.
        let mut answer = None;
        for _ in 0..40 {
            answer = super::http::get(ctx.nodes[node], &path).await;
            if !matches!(answer, Some((503, _))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let Some((status, body)) = answer else {
            why = Some("no answer".to_string());
            break;
        };
        if status != 200 {
            why = Some(format!("{status} {body}"));
            break;
        }
        if body["epoch"] != epoch.as_str() {
            why = Some(format!("the history is of epoch {}", body["epoch"]));
            break;
        }
        let mut view = ctx.view.lock().expect("view");
        let held = view.rooms.entry(room).or_default();
        for event in body["events"].as_array().cloned().unwrap_or_default() {
            let id = event["id"].as_str().unwrap_or_default().to_string();
            let seq = event["seq"].as_u64().unwrap_or(0);
            seen.insert(seq);
            if held.ids.insert(id.clone()) {
                held.taken.push(Taken {
                    n: event["data"]["n"].as_u64().unwrap_or(0),
                    id,
                    seq,
                    epoch: epoch.clone(),
                    refetched: true,
                });
            }
        }
        drop(view);
        if body["more"] != true {
            break;
        }
        from = body["last_seq"].as_u64().unwrap_or(from);
    }
    if why.is_none() && !(since + 1..=upto).all(|s| seen.contains(&s)) {
        why = Some(format!("the history lacks some of {}..={upto}", since + 1));
    }
    if let Some(why) = why {
        ctx.note(format!(
            "room {room}: refetch from {since} through node {node}: gap: {why}"
        ));
        let mut view = ctx.view.lock().expect("view");
        view.rooms.entry(room).or_default().gaps.push((Instant::now(), why));
    }
}
