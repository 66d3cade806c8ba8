//! What a WebTransport session does with states and acks, whichever QUIC driver runs it (quinn's
//! tasks or the sans-IO `WtSession`): room aliases, the route of each state (control stream or
//! datagram, `core::routing`) and the repair of lost state datagrams (`core::repair`).
//! It reaches the QUIC connection only through `DatagramPath` and takes `now` as an argument.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::debug;

use super::super::h3;
use crate::core::publication::{Publication, RoomId, StateDelta};
use crate::core::repair::{DatagramRepair, RepairAction, RepairPolicy};
use crate::core::routing::{Route, StateDatagrams, StateRouting};
use crate::core::wire::{self, ClientMessage};
use crate::core::{ClientCommand, CommandError, Kind, Outgoing, RoomName, ServerControl};
use crate::metrics::{Metrics, Transport};

/// What `StateDelivery` needs of a QUIC connection: its loss count, datagram size and RTT, and
/// a way to send a datagram (quinn's `Connection` and quinn-proto's implement it).
pub trait DatagramPath {
    /// QUIC's count of packets lost on the path so far.
    fn lost_packets(&mut self) -> u64;
    /// The largest datagram the peer takes now, `None` when it takes none.
    fn max_datagram_size(&mut self) -> Option<usize>;
    fn rtt(&mut self) -> Duration;
    /// Queues `datagram`; false when it could not be (too large, datagrams off).
    fn send_datagram(&mut self, datagram: Bytes) -> bool;
}

impl DatagramPath for quinn::Connection {
    fn lost_packets(&mut self) -> u64 {
        self.stats().path.lost_packets
    }

    fn max_datagram_size(&mut self) -> Option<usize> {
        quinn::Connection::max_datagram_size(self)
    }

    fn rtt(&mut self) -> Duration {
        quinn::Connection::rtt(self)
    }

    fn send_datagram(&mut self, datagram: Bytes) -> bool {
        quinn::Connection::send_datagram(self, datagram).is_ok()
    }
}

impl DatagramPath for quinn_proto::Connection {
    fn lost_packets(&mut self) -> u64 {
        self.stats().path.lost_packets
    }

    fn max_datagram_size(&mut self) -> Option<usize> {
        self.datagrams().max_size()
    }

    fn rtt(&mut self) -> Duration {
        quinn_proto::Connection::rtt(self)
    }

    fn send_datagram(&mut self, datagram: Bytes) -> bool {
        // A state is conflated upstream: when the send buffer is full, the oldest datagram
        // (an older state, repaired anyway) gives way.
        self.datagrams().send(datagram, true).is_ok()
    }
}

/// What one message from the client's control stream was.
#[derive(Debug)]
pub enum FromClient {
    /// A command, or why it could not be read as one (answered with an error).
    Command(Result<ClientCommand, CommandError>),
    /// An acknowledgement, taken here: the client was heard, nothing for the session.
    Heard,
}

/// One session's aliases, routing and repair of states.
#[derive(Debug)]
pub struct StateDelivery {
    /// The datagram prefix of this session (its quarter stream ID).
    prefix: Bytes,
    metrics: Arc<Metrics>,
    repair: DatagramRepair,
    /// Which states go as datagrams and which on the stream (`core::routing`).
    routing: StateRouting,
    state_datagrams: StateDatagrams,
    repairs: Vec<RepairAction>,
    /// The rooms whose alias (their `RoomId`) this session announced: a datagram names its
    /// room by alias only after the client was told it on the stream.
    aliases: Vec<(RoomId, RoomName)>,
    /// The version of each room whose state went as a delta datagram last, so that its
    /// repair resends the delta (the whole state may not fit a datagram).
    delta_datagrams: std::collections::HashMap<RoomId, u64>,
    /// The client sent `hello`: it is told how states travel (`welcome`), now and whenever
    /// the route changes.
    hello: bool,
    /// A `welcome` goes out before the next `pong` (the answer to `hello`).
    welcome_owed: bool,
}

impl StateDelivery {
    pub fn new(prefix: Bytes, metrics: Arc<Metrics>, repair: RepairPolicy, state_datagrams: StateDatagrams) -> Self {
        Self {
            prefix,
            metrics,
            repair: DatagramRepair::new(repair),
            routing: StateRouting::new(state_datagrams),
            state_datagrams,
            repairs: Vec::new(),
            aliases: Vec::new(),
            delta_datagrams: std::collections::HashMap::new(),
            hello: false,
            welcome_owed: false,
        }
    }

    /// When a resend is next due, if any state waits for an ack.
    pub fn next_due(&self) -> Option<Instant> {
        self.repair.next_due()
    }

    /// States sent as datagrams and not acknowledged yet.
    pub fn unacknowledged(&self) -> usize {
        self.repair.len()
    }

    /// One message read from the control stream.
    pub fn on_frame(&mut self, frame: &[u8], now: Instant) -> FromClient {
        match wire::decode_client(frame) {
            Ok(ClientMessage::Command(command)) => {
                if let ClientCommand::Unsubscribe { room } = &command {
                    self.left(room);
                }
                FromClient::Command(Ok(command))
            }
            // Answered as a ping is, with a `welcome` before its `pong` (`write_batch`).
            Ok(ClientMessage::Hello) => {
                self.hello = true;
                self.welcome_owed = true;
                FromClient::Command(Ok(ClientCommand::Ping))
            }
            Ok(ack) => {
                self.metrics.transport(Transport::WebTransport).client_messages.inc();
                self.on_ack(ack, now);
                FromClient::Heard
            }
            Err(error) => FromClient::Command(Err(error)),
        }
    }

    /// A datagram from the client: acknowledgements for the repair; anything else (another
    /// session's, undecodable, not an ack) is ignored. Returns whether it was this session's.
    pub fn on_datagram(&mut self, datagram: &[u8], now: Instant) -> bool {
        let Some(payload) = h3::datagram_payload(datagram, &self.prefix) else {
            return false;
        };
        if let Ok(ack) = wire::decode_client(payload) {
            self.on_ack(ack, now);
        }
        true
    }

    /// What the client acknowledged in one message: a room by name, or several by alias.
    fn on_ack(&mut self, message: ClientMessage, now: Instant) {
        match message {
            ClientMessage::Ack { room, version } => {
                if let Some(id) = self.alias_of(&room) {
                    self.metrics.repair_acks.inc();
                    self.repair.acked(id, version, now);
                }
            }
            ClientMessage::Acks(acks) => {
                self.metrics.repair_acks.inc_by(acks.len() as u64);
                for ack in acks {
                    self.repair.acked(RoomId(ack.alias), ack.version, now);
                }
            }
            ClientMessage::Command(_) | ClientMessage::Hello => {}
        }
    }

    /// The alias announced for `room` in this session.
    fn alias_of(&self, room: &RoomName) -> Option<RoomId> {
        self.aliases.iter().find(|(_, name)| name == room).map(|(id, _)| *id)
    }

    /// Writes the `alias` notice of `room` (unless already given) for datagrams to use.
    fn announce(&mut self, room: &RoomName, id: RoomId, out: &mut BytesMut) {
        if self.aliases.iter().any(|(other, name)| *other == id && name == room) {
            return;
        }
        self.left(room);
        self.aliases.push((id, room.clone()));
        wire::put_frame(out, &wire::encode_alias(room, id.0));
    }

    /// The client left `room`: no repair, and its alias is announced again if it comes back.
    fn left(&mut self, room: &RoomName) {
        if let Some(id) = self.alias_of(room) {
            self.repair.forget(id);
            self.delta_datagrams.remove(&id);
            self.aliases.retain(|(other, _)| *other != id);
        }
    }

    /// A state's datagram: the session's prefix, then the state by its alias (one shared copy
    /// for the usual session on the client's first stream).
    fn datagram_of(&self, p: &Publication) -> Bytes {
        if self.prefix[..] == [0x00] {
            return p.session0_datagram().clone();
        }
        let message = p.aliased_message();
        let mut datagram = BytesMut::with_capacity(self.prefix.len() + message.len());
        datagram.extend_from_slice(&self.prefix);
        datagram.extend_from_slice(&message);
        datagram.freeze()
    }

    /// A delta's datagram, as `datagram_of` makes a state's.
    fn delta_datagram_of(&self, delta: &StateDelta) -> Bytes {
        if self.prefix[..] == [0x00] {
            return delta.session0_datagram().clone();
        }
        let message = delta.aliased_message();
        let mut datagram = BytesMut::with_capacity(self.prefix.len() + message.len());
        datagram.extend_from_slice(&self.prefix);
        datagram.extend_from_slice(message);
        datagram.freeze()
    }

    /// The delta that `p`'s repair resends, if it went as one.
    fn repaired_delta<'p>(&self, p: &'p Publication) -> Option<&'p StateDelta> {
        (self.delta_datagrams.get(&p.room_id) == Some(&p.number()))
            .then(|| p.delta())
            .flatten()
    }

    /// Writes a batch: states as datagrams where `core::routing` says so and they fit, the rest
    /// framed into `out` for the control stream, in order.
    pub fn write_batch(&mut self, batch: &[Outgoing], out: &mut BytesMut, path: &mut impl DatagramPath, now: Instant) {
        // What only states need: each read of quinn's state takes its connection lock, and a
        // batch of events (most batches) needs none of it.
        let has_state = batch.iter().any(|item| {
            matches!(item, Outgoing::Publication(p) if p.kind == Kind::State) || matches!(item, Outgoing::Delta(_))
        });
        let welcome_now = self.welcome_owed
            && batch
                .iter()
                .any(|item| matches!(item, Outgoing::Control(ServerControl::Pong)));
        let mut route_changed = false;
        if (has_state || welcome_now) && self.state_datagrams == StateDatagrams::AfterLoss {
            let lost = path.lost_packets();
            let change = self.routing.path_lost(lost, now);
            match change {
                Some(Route::Datagram) => debug!(lost, "packet loss on this session: states go as datagrams"),
                Some(Route::Stream) => debug!("no loss for a while: states go on the stream again"),
                None => {}
            }
            route_changed = change.is_some();
        }
        // The answer to `hello` (before its `pong`, in this batch), and the news of a new route
        // to a client that said `hello`, go first: before any state that takes the route (its
        // datagrams may still overtake this stream message).
        if welcome_now || (route_changed && self.hello) {
            self.welcome(out, path);
        }
        let max_datagram = if has_state && self.routing.datagrams_on() {
            path.max_datagram_size()
        } else {
            None
        };
        let rtt = if has_state { path.rtt() } else { Duration::ZERO };
        for item in batch {
            match item {
                Outgoing::Control(control) => {
                    self.routing.control(control);
                    wire::put_frame(out, &wire::encode_control(control));
                    match control {
                        ServerControl::Unsubscribed { room } => self.left(room),
                        // The alias follows the subscribed reply, before any datagram uses it.
                        // The client forgets its base on every `subscribed` (docs/PROTOCOL.md,
                        // "Delta states"): a delta datagram still waiting for its ack is repaired
                        // with the whole state, not as a delta.
                        ServerControl::Subscribed { room, room_id, .. } => {
                            self.delta_datagrams.remove(room_id);
                            self.announce(room, *room_id, out)
                        }
                        _ => {}
                    }
                }
                Outgoing::Publication(p) if p.kind != Kind::State => wire::put_frame(out, p.wire_message()),
                Outgoing::Publication(p) => self.write_state(p, None, max_datagram, rtt, out, path, now),
                Outgoing::Delta(p) => {
                    // Only against a base the client surely holds: the queue handed this session
                    // the base last, and it went on the stream or its datagram was acknowledged
                    // (docs/PROTOCOL.md, "Delta states"). Otherwise the whole state.
                    let delta = if self.repair.is_pending(p.room_id) {
                        None
                    } else {
                        p.delta()
                    };
                    self.write_state(p, delta, max_datagram, rtt, out, path, now);
                }
            }
        }
    }

    /// Writes `welcome`: how this session's states travel now (docs/PROTOCOL.md, "Which data
    /// uses which path").
    fn welcome(&mut self, out: &mut BytesMut, path: &mut impl DatagramPath) {
        self.welcome_owed = false;
        let max = path.max_datagram_size().unwrap_or(0);
        let datagrams = self.routing.datagrams_on() && max > 0;
        let message = wire::encode_welcome(self.state_datagrams.as_str(), datagrams, max as u64);
        wire::put_frame(out, &message);
    }

    /// Writes one state, whole or as `delta`: as a datagram where `core::routing` says so and
    /// it fits (then repaired until acknowledged), else framed into `out` for the stream.
    #[allow(clippy::too_many_arguments)]
    fn write_state(
        &mut self,
        p: &Arc<Publication>,
        delta: Option<&StateDelta>,
        max_datagram: Option<usize>,
        rtt: Duration,
        out: &mut BytesMut,
        path: &mut impl DatagramPath,
        now: Instant,
    ) {
        let message = delta.map_or_else(|| p.wire_message(), StateDelta::wire_message);
        let datagram = max_datagram.map(|max| {
            let datagram = match delta {
                Some(d) => self.delta_datagram_of(d),
                None => self.datagram_of(p),
            };
            (max, datagram)
        });
        let fits = datagram.as_ref().is_some_and(|(max, d)| d.len() <= *max);
        if self.routing.route(&p.room, fits) == Route::Datagram {
            if !self.aliases.iter().any(|(id, _)| *id == p.room_id) {
                // The room has a new ID on this node since the subscribe: its new
                // alias goes out on the stream, and this state with it.
                self.announce(&p.room, p.room_id, out);
                wire::put_frame(out, message);
                return;
            }
            if let Some((_, datagram)) = datagram {
                if path.send_datagram(datagram) {
                    self.repair.sent(p, p.number(), now, rtt);
                    if delta.is_some() {
                        self.delta_datagrams.insert(p.room_id, p.number());
                    } else {
                        self.delta_datagrams.remove(&p.room_id);
                    }
                    return;
                }
            }
        }
        self.repair.forget(p.room_id);
        wire::put_frame(out, message);
    }

    /// Does the resends due at `now`: datagrams through `path`, stream copies framed into `out`.
    pub fn repair_due(&mut self, now: Instant, out: &mut BytesMut, path: &mut impl DatagramPath) {
        let mut repairs = std::mem::take(&mut self.repairs);
        self.repair.poll(now, &mut repairs);
        for action in repairs.drain(..) {
            match action {
                RepairAction::Datagram(p) => {
                    self.metrics.repair_datagrams.inc();
                    let datagram = match self.repaired_delta(&p) {
                        Some(delta) => self.delta_datagram_of(delta),
                        None => self.datagram_of(&p),
                    };
                    let _ = path.send_datagram(datagram);
                }
                RepairAction::Stream(p) => {
                    self.metrics.repair_stream.inc();
                    let message = self
                        .repaired_delta(&p)
                        .map_or_else(|| p.wire_message(), StateDelta::wire_message);
                    wire::put_frame(out, message);
                }
            }
        }
        self.repairs = repairs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::publication::JsonData;
    use crate::core::wire::{FrameDecoder, ServerMessage};
    use crate::core::Now;

    /// A path that counts its losses as told and keeps the datagrams sent.
    #[derive(Default)]
    struct FakePath {
        lost: u64,
        sent: Vec<Bytes>,
    }

    impl DatagramPath for FakePath {
        fn lost_packets(&mut self) -> u64 {
            self.lost
        }
        fn max_datagram_size(&mut self) -> Option<usize> {
            Some(1162)
        }
        fn rtt(&mut self) -> Duration {
            Duration::from_millis(1)
        }
        fn send_datagram(&mut self, datagram: Bytes) -> bool {
            self.sent.push(datagram);
            true
        }
    }

    fn room() -> RoomName {
        RoomName::parse("game:1").expect("room")
    }

    fn subscribed(version: u64, recovered: Option<bool>) -> Outgoing {
        Outgoing::Control(ServerControl::Subscribed {
            room: room(),
            room_id: RoomId(17),
            epoch: "e".into(),
            version,
            seq: 0,
            recovered,
            request: None,
        })
    }

    fn state(version: u64, now: Instant) -> Outgoing {
        let data = JsonData::parse(b"1").expect("json");
        let now = Now {
            unix_ms: 1,
            instant: now,
        };
        Outgoing::Publication(Arc::new(Publication::new(
            RoomId(17),
            room(),
            Kind::State,
            version,
            None,
            &data,
            now,
        )))
    }

    fn delivery(mode: StateDatagrams) -> StateDelivery {
        StateDelivery::new(
            Bytes::from_static(&[0]),
            Arc::new(Metrics::new()),
            RepairPolicy::default(),
            mode,
        )
    }

    /// The types of the stream messages in `out`, and the welcomes' bodies as JSON.
    fn stream(out: &mut BytesMut) -> Vec<serde_json::Value> {
        let mut decoder = FrameDecoder::default();
        decoder.extend(&out.split());
        let mut messages = Vec::new();
        while let Some(frame) = decoder.next_frame(1 << 20).expect("frame") {
            let message = wire::decode_server(&frame).expect("decode");
            messages.push(match message {
                ServerMessage::Welcome(_) => message.to_json(),
                other => other.to_json()["type"].clone(),
            });
        }
        messages
    }

    #[test]
    fn hello_is_answered_by_a_welcome_before_the_pong_and_again_when_the_route_changes() {
        let t0 = Instant::now();
        let mut states = delivery(StateDatagrams::AfterLoss);
        let mut path = FakePath::default();
        let mut out = BytesMut::new();
        let hello = wire::encode_client(&ClientMessage::Hello);
        assert!(matches!(
            states.on_frame(&hello, t0),
            FromClient::Command(Ok(ClientCommand::Ping))
        ));
        states.write_batch(&[Outgoing::Control(ServerControl::Pong)], &mut out, &mut path, t0);
        let welcome = serde_json::json!({"type": "welcome", "state_datagrams": "after-loss", "datagrams": false, "max_datagram": 1162});
        assert_eq!(stream(&mut out), [welcome.clone(), "pong".into()]);
        // Once only: the next pong comes alone.
        states.write_batch(&[Outgoing::Control(ServerControl::Pong)], &mut out, &mut path, t0);
        assert_eq!(stream(&mut out), ["pong"]);
        // A loss: the welcome says so before the first state sent as a datagram.
        states.write_batch(&[subscribed(1, None), state(1, t0)], &mut out, &mut path, t0);
        assert_eq!(stream(&mut out), ["subscribed", "alias", "state"]);
        path.lost = 1;
        states.write_batch(&[state(2, t0)], &mut out, &mut path, t0);
        let mut datagrams_on = welcome.clone();
        datagrams_on["datagrams"] = true.into();
        assert_eq!(stream(&mut out), [datagrams_on]);
        assert_eq!(path.sent.len(), 1, "version 2 went as a datagram");
        // Clean for the clean period: back on the stream, said first.
        let later = t0 + crate::core::routing::CLEAN_PERIOD;
        states.write_batch(&[state(3, later)], &mut out, &mut path, later);
        assert_eq!(stream(&mut out), [welcome, "state".into()]);
    }

    #[test]
    fn the_welcome_comes_first_in_its_batch_before_any_state_on_a_new_route() {
        let t0 = Instant::now();
        let mut states = delivery(StateDatagrams::AfterLoss);
        let mut path = FakePath::default();
        let mut out = BytesMut::new();
        states.write_batch(&[subscribed(1, None), state(1, t0)], &mut out, &mut path, t0);
        assert_eq!(stream(&mut out), ["subscribed", "alias", "state"]);
        let hello = wire::encode_client(&ClientMessage::Hello);
        states.on_frame(&hello, t0);
        path.lost = 1;
        let pong = Outgoing::Control(ServerControl::Pong);
        states.write_batch(&[state(2, t0), pong], &mut out, &mut path, t0);
        let welcome = serde_json::json!({"type": "welcome", "state_datagrams": "after-loss", "datagrams": true, "max_datagram": 1162});
        assert_eq!(stream(&mut out), [welcome, "pong".into()]);
        assert_eq!(path.sent.len(), 1, "version 2 went as a datagram, after the welcome");
    }

    #[test]
    fn without_hello_no_welcome() {
        let t0 = Instant::now();
        let mut states = delivery(StateDatagrams::Always);
        let mut path = FakePath::default();
        let mut out = BytesMut::new();
        let ping = wire::encode_client(&ClientMessage::Command(ClientCommand::Ping));
        assert!(matches!(
            states.on_frame(&ping, t0),
            FromClient::Command(Ok(ClientCommand::Ping))
        ));
        states.write_batch(&[Outgoing::Control(ServerControl::Pong)], &mut out, &mut path, t0);
        assert_eq!(stream(&mut out), ["pong"]);
    }

    #[test]
    fn the_state_after_a_subscribed_with_a_state_or_a_notice_goes_on_the_stream() {
        let t0 = Instant::now();
        let mut states = delivery(StateDatagrams::Always);
        let mut path = FakePath::default();
        let mut out = BytesMut::new();
        states.write_batch(
            &[subscribed(4, None), state(4, t0), state(5, t0)],
            &mut out,
            &mut path,
            t0,
        );
        assert_eq!(stream(&mut out), ["subscribed", "alias", "state"]);
        assert_eq!(path.sent.len(), 1, "version 5 as a datagram");
        // A notice with `recovered: false` carries version 0; the newest state follows it, on
        // the stream, so it cannot overtake the notice. The alias is not announced again.
        states.write_batch(&[subscribed(0, Some(false)), state(2, t0)], &mut out, &mut path, t0);
        assert_eq!(stream(&mut out), ["subscribed", "state"]);
        assert_eq!(path.sent.len(), 1);
        states.write_batch(&[state(3, t0)], &mut out, &mut path, t0);
        assert_eq!(path.sent.len(), 2);
    }
}
