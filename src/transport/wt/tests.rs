//! The session's behaviour in virtual time (`pair`): handshake, refusals, repair under loss,
//! idle, keep-alive and both close handshakes. Every deadline is checked on both sides of it.

use std::sync::Arc;
use std::time::Duration;

use super::pair::{ClientSettingsMode, Pair, Setup};
use super::session::{CloseRequest, SessionEnd, SessionEvent};
use crate::core::publication::{JsonData, Publication, RoomId};
use crate::core::wire::{self, AliasAck, ClientMessage, ServerMessage};
use crate::core::{close_code, ClientCommand, ErrorCode, Kind, Now, Outgoing, RoomName, ServerControl};
use crate::transport::h3::{self, H3ErrorCode};
use crate::transport::KEPT_WRITE_BUFFER;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// HTTP/3's codes as QUIC application errors.
const H3_NO_ERROR: u64 = 0x100;
const H3_REQUEST_REJECTED: u64 = 0x10b;
const H3_MISSING_SETTINGS: u64 = 0x10a;
const H3_MESSAGE_ERROR: u64 = 0x10e;

fn room() -> RoomName {
    RoomName::parse("game:1234").expect("room")
}

/// The alias (room ID) the tests' room has on the server.
const ALIAS: u64 = 17;

fn subscribed() -> Outgoing {
    Outgoing::Control(ServerControl::Subscribed {
        room: room(),
        room_id: RoomId(ALIAS),
        epoch: "3f9c0a51d2e4b771".into(),
        version: 0,
        seq: 0,
        recovered: None,
        request: None,
    })
}

fn state(pair: &Pair, version: u64) -> Outgoing {
    Outgoing::Publication(state_publication(pair, version, &format!("{{\"home\":{version}}}")))
}

/// A state of `room()` (by its alias) with body `data`, published at the pair's time.
fn state_publication(pair: &Pair, version: u64, data: &str) -> Arc<Publication> {
    let data = JsonData::parse(data.as_bytes()).expect("json");
    let now = Now {
        unix_ms: 1_700_000_000_000,
        instant: pair.now,
    };
    Arc::new(Publication::new(
        RoomId(ALIAS),
        room(),
        Kind::State,
        version,
        None,
        &data,
        now,
    ))
}

/// An open session whose client subscribed to `room()` (alias announced).
fn subscribed_pair(setup: Setup) -> Pair {
    let mut pair = Pair::new(setup);
    pair.establish();
    let now = pair.now;
    assert!(pair.server.session().deliver(now, &[subscribed()]));
    pair.run_for(50 * MS);
    assert!(
        matches!(pair.client.decoded()[..], [ServerMessage::Subscribed(_), ServerMessage::Alias(ref a)] if a.alias == ALIAS),
        "{:?}",
        pair.client.decoded()
    );
    pair
}

#[test]
fn the_handshake_opens_a_session_whose_first_message_is_its_first_command() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    assert_eq!(pair.client.status, Some(200));
    assert_eq!(
        pair.client.server_uni,
        h3::server_control_stream(),
        "the documented SETTINGS, whole"
    );
    let request = &pair.server.requests[0];
    assert_eq!(request.path, "/wt");
    assert_eq!(request.origin.as_deref(), Some("https://scores.example"));
    assert!(matches!(
        pair.server.events[..],
        [
            SessionEvent::Request(_),
            SessionEvent::Established,
            SessionEvent::Command(Ok(ClientCommand::Ping))
        ]
    ));
    // Commands flow in order; replies come back on the control stream.
    pair.client
        .send(&ClientMessage::Command(ClientCommand::Unsubscribe { room: room() }));
    pair.run_for(10 * MS);
    assert_eq!(
        pair.server.commands(),
        vec![ClientCommand::Ping, ClientCommand::Unsubscribe { room: room() }]
    );
    let now = pair.now;
    pair.server
        .session()
        .deliver(now, &[Outgoing::Control(ServerControl::Pong)]);
    pair.run_for(10 * MS);
    assert!(matches!(pair.client.decoded()[..], [ServerMessage::Pong]));
    assert!(pair.client.stopped.is_empty(), "no stream of the client was stopped");
}

/// The server takes UDP payloads of 1,200 bytes (its `max_udp_payload_size`), so a client has
/// no larger path MTU to probe for: quinn's clients otherwise send about six probes of up to
/// 1,452 bytes, each PADDING the server's quinn-proto parses a byte at a time.
#[test]
fn a_client_sends_no_packet_above_the_1200_bytes_the_server_takes() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    pair.run_for(Duration::from_secs(5));
    assert!(!pair.client.is_closed(), "the session still runs");
    assert_eq!(pair.to_server.largest, 1200, "the client's Initial is padded to 1,200");
    assert!(pair.to_client.largest <= 1200);
}

#[test]
fn a_connect_to_another_path_is_answered_404_the_client_can_read() {
    let mut pair = Pair::new(Setup {
        path: "/elsewhere",
        ..Setup::default()
    });
    assert!(pair.run_until_true(S, |p| p.client.status.is_some()));
    let refused_at = pair.now;
    assert_eq!(pair.client.status, Some(404));
    assert!(pair.server.requests.is_empty(), "the application is not asked");
    assert_eq!(pair.server.ended(), Some(&SessionEnd::Refused(404)));
    pair.run_for(10 * MS);
    assert!(pair.client.connect_finished, "the response ends the CONNECT stream");
    // RFC 9114 §6.2.1: the client's control and QPACK streams are never stopped.
    assert!(pair.client.stopped.is_empty(), "{:?}", pair.client.stopped);
    // A client that does not close is closed after a second, not before.
    pair.run_until(refused_at + 990 * MS);
    assert!(pair.client.lost.is_none());
    pair.run_until(refused_at + 1100 * MS);
    assert_eq!(
        pair.client.closed_with(),
        Some((H3_REQUEST_REJECTED, b"refused".to_vec()))
    );
}

#[test]
fn an_admission_refusal_reaches_the_client_as_its_status() {
    for status in [403, 429, 503] {
        let mut pair = Pair::new(Setup {
            admit: status,
            ..Setup::default()
        });
        assert!(pair.run_until_true(S, |p| p.client.status.is_some()));
        assert_eq!(pair.client.status, Some(status));
        assert_eq!(pair.server.requests.len(), 1, "the application decided");
        assert_eq!(pair.server.ended(), Some(&SessionEnd::Refused(status)));
        assert!(!pair.server.established());
        assert!(pair.client.stopped.is_empty());
    }
}

#[test]
fn a_client_control_stream_without_settings_first_is_h3_missing_settings() {
    let mut pair = Pair::new(Setup {
        settings: ClientSettingsMode::GoawayFirst,
        ..Setup::default()
    });
    assert!(pair.run_until_true(S, |p| p.client.lost.is_some()));
    assert_eq!(
        pair.client.closed_with().map(|(code, _)| code),
        Some(H3_MISSING_SETTINGS)
    );
    assert!(matches!(
        pair.server.ended(),
        Some(SessionEnd::H3(error)) if error.code == H3ErrorCode::MissingSettings
    ));
    assert_eq!(pair.client.status, None, "the CONNECT was never processed");
}

#[test]
fn a_connect_waits_for_the_client_settings_and_the_handshake_times_out_without_them() {
    let mut pair = Pair::new(Setup {
        settings: ClientSettingsMode::None,
        ..Setup::default()
    });
    let start = pair.now;
    pair.run_until(start + 9900 * MS);
    assert!(
        pair.server.requests.is_empty(),
        "not processed before the client's SETTINGS"
    );
    assert_eq!(pair.client.status, None);
    assert!(pair.client.lost.is_none());
    pair.run_until(start + 10_100 * MS);
    assert_eq!(
        pair.client.closed_with().map(|(code, _)| code),
        Some(u64::from(close_code::IDLE_TIMEOUT))
    );
    assert_eq!(pair.server.ended(), Some(&SessionEnd::HandshakeTimeout));
}

#[test]
fn a_connect_from_a_client_without_http3_datagrams_is_malformed() {
    let mut pair = Pair::new(Setup {
        settings: ClientSettingsMode::NoDatagrams,
        ..Setup::default()
    });
    assert!(pair.run_until_true(S, |p| p.client.connect_reset.is_some()));
    assert_eq!(pair.client.connect_reset, Some(H3_MESSAGE_ERROR));
    assert_eq!(pair.server.ended(), Some(&SessionEnd::Malformed));
    assert!(pair.server.requests.is_empty());
}

#[test]
fn a_session_without_a_first_message_in_time_is_closed_with_4002() {
    let mut pair = Pair::new(Setup::default());
    pair.client.first_message = None;
    let start = pair.now;
    pair.run_until(start + 9900 * MS);
    assert_eq!(pair.client.status, Some(200));
    assert!(!pair.server.established());
    assert!(pair.client.lost.is_none());
    pair.run_until(start + 10_100 * MS);
    assert_eq!(
        pair.client.closed_with().map(|(code, _)| code),
        Some(u64::from(close_code::IDLE_TIMEOUT))
    );
    assert_eq!(pair.server.ended(), Some(&SessionEnd::HandshakeTimeout));
}

#[test]
fn a_lost_state_datagram_is_resent_and_sent_once_on_the_stream() {
    let mut pair = subscribed_pair(Setup::default());
    let metrics = pair.server.metrics.clone();
    // Without loss: a datagram, acknowledged, never resent.
    let now = pair.now;
    let v1 = state(&pair, 1);
    pair.server.session().deliver(now, &[v1]);
    pair.run_for(100 * MS);
    assert_eq!(pair.client.datagrams.len(), 1);
    assert_eq!(pair.client.newest_state("game:1234", ALIAS), Some(1));
    assert_eq!(pair.server.session().unacknowledged_states(), 0);
    assert_eq!(metrics.repair_datagrams.get(), 0);
    // The packet carrying the next state's datagram is lost.
    pair.to_client.drop_next = 1;
    let now = pair.now;
    let v2 = state(&pair, 2);
    pair.server.session().deliver(now, &[v2]);
    pair.settle();
    assert_eq!(pair.to_client.dropped, 1);
    assert_eq!(pair.server.session().unacknowledged_states(), 1);
    pair.run_for(15 * MS);
    assert_eq!(
        pair.client.newest_state("game:1234", ALIAS),
        Some(1),
        "not before the first gap"
    );
    pair.run_for(200 * MS);
    assert_eq!(pair.client.newest_state("game:1234", ALIAS), Some(2));
    assert_eq!(metrics.repair_datagrams.get(), 1, "one resend was enough");
    assert_eq!(metrics.repair_stream.get(), 1, "and one copy on the stream");
    assert!(pair
        .client
        .decoded()
        .iter()
        .any(|m| matches!(m, ServerMessage::State(s) if s.version == 2)));
    assert_eq!(pair.server.session().unacknowledged_states(), 0);
}

/// A bracket-sized state (over `delta::MIN_STATE_BYTES`, too large for a datagram) whose match
/// `version % 40` has the score `version`.
fn bracket_state(pair: &Pair, version: u64, previous: Option<&Arc<Publication>>) -> Arc<Publication> {
    let matches: Vec<String> = (0..40)
        .map(|i| {
            let score = if i == version % 40 { version } else { i };
            format!(r#"{{"id":{i},"opponent1":{{"id":{i},"score":{score}}},"status":2}}"#)
        })
        .collect();
    let data = JsonData::parse(format!(r#"{{"match":[{}]}}"#, matches.join(",")).as_bytes()).expect("json");
    let now = Now {
        unix_ms: 1_700_000_000_000,
        instant: pair.now,
    };
    Arc::new(Publication::new(RoomId(ALIAS), room(), Kind::State, version, None, &data, now).with_delta_base(previous))
}

/// Over datagrams a delta is only made against a version the client acknowledged (or got on
/// the stream): under loss both ways the client drops deltas it cannot apply, never fails one
/// on the stream, and ends on the newest state byte for byte.
#[test]
fn under_loss_delta_datagrams_never_break_the_chain() {
    let mut pair = subscribed_pair(Setup::default());
    for link in [&mut pair.to_client, &mut pair.to_server] {
        link.loss = 0.3;
        link.latency = 10 * MS;
        link.jitter = 20 * MS;
    }
    let mut previous = bracket_state(&pair, 1, None);
    let now = pair.now;
    pair.server
        .session()
        .deliver(now, &[Outgoing::Publication(previous.clone())]);
    // Further apart than an ack takes, so most go as deltas (a state published while the
    // previous delta datagram waits for its ack goes whole).
    for version in 2..=60 {
        pair.run_for(80 * MS);
        // As the queue hands them: each state as a delta against the one before it.
        let next = bracket_state(&pair, version, Some(&previous));
        let now = pair.now;
        pair.server.session().deliver(now, &[Outgoing::Delta(next.clone())]);
        previous = next;
    }
    let newest = previous.data().to_string();
    let converged = pair.run_until_true(5 * S, |p| p.client.held.get("game:1234").is_some_and(|(v, _)| *v == 60));
    assert!(
        converged,
        "held: {:?}, stream failures {}, dropped {}, applied {}",
        pair.client.held.get("game:1234").map(|(v, _)| v),
        pair.client.stream_delta_failures,
        pair.client.delta_datagrams_dropped,
        pair.client.deltas_applied
    );
    assert_eq!(pair.client.held["game:1234"].1, newest, "byte for byte");
    assert_eq!(pair.client.stream_delta_failures, 0);
    assert!(pair.client.deltas_applied > 0, "deltas were applied");
    assert!(
        pair.to_client.dropped > 0 && pair.to_server.dropped > 0,
        "the links lost packets"
    );
    let delta_datagrams = pair
        .client
        .datagrams
        .iter()
        .filter(|d| matches!(wire::decode_server(&d[1..]), Ok(ServerMessage::AliasedDelta(_))))
        .count();
    assert!(delta_datagrams > 0, "deltas went as datagrams");
}

/// A `subscribed` notice tells the client to forget its base (docs/PROTOCOL.md, "Delta
/// states"): a delta datagram lost before it is repaired with the whole state on the stream,
/// never as a stream delta against the forgotten base.
#[test]
fn after_a_notice_a_lost_delta_datagram_is_repaired_whole() {
    let mut pair = subscribed_pair(Setup::default());
    let first = bracket_state(&pair, 1, None);
    let now = pair.now;
    // Too large for a datagram: on the stream, so the client holds it as the base.
    pair.server
        .session()
        .deliver(now, &[Outgoing::Publication(first.clone())]);
    pair.run_for(50 * MS);
    pair.to_client.loss = 1.0;
    let second = bracket_state(&pair, 2, Some(&first));
    let now = pair.now;
    pair.server.session().deliver(now, &[Outgoing::Delta(second.clone())]);
    pair.run_for(5 * MS);
    let now = pair.now;
    pair.server.session().deliver(now, &[subscribed()]);
    let seen_before = pair.client.decoded().len();
    pair.to_client.loss = 0.0;
    let newest = second.data().to_string();
    let converged = pair.run_until_true(5 * S, |p| p.client.held.get("game:1234").is_some_and(|(v, _)| *v == 2));
    assert!(
        converged,
        "the repair delivered version 2: held {:?}, datagrams {}, after the notice {:?}",
        pair.client.held.get("game:1234").map(|(v, _)| v),
        pair.client.datagrams.len(),
        pair.client.decoded()[seen_before..]
            .iter()
            .map(|m| format!("{m:?}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(pair.client.held["game:1234"].1, newest);
    let after_notice: Vec<String> = pair.client.decoded()[seen_before..]
        .iter()
        .map(|m| format!("{m:?}"))
        .collect();
    assert!(
        !pair.client.decoded()[seen_before..]
            .iter()
            .any(|m| matches!(m, ServerMessage::Delta(_))),
        "a stream delta after the notice: {after_notice:?}"
    );
}

#[test]
fn under_loss_and_reordering_the_client_ends_on_the_newest_state() {
    let mut pair = subscribed_pair(Setup::default());
    for link in [&mut pair.to_client, &mut pair.to_server] {
        link.loss = 0.3;
        link.latency = 10 * MS;
        link.jitter = 20 * MS;
    }
    for version in 1..=40 {
        let now = pair.now;
        let update = state(&pair, version);
        pair.server.session().deliver(now, &[update]);
        pair.run_for(25 * MS);
    }
    let converged = pair.run_until_true(S, |p| p.client.newest_state("game:1234", ALIAS) == Some(40));
    assert!(
        converged,
        "newest seen: {:?}",
        pair.client.newest_state("game:1234", ALIAS)
    );
    assert!(
        pair.to_client.dropped > 0 && pair.to_server.dropped > 0,
        "the links lost packets"
    );
    assert!(pair.server.metrics.repair_datagrams.get() > 0);
    assert!(pair.server.session().is_open());
}

#[test]
fn a_silent_client_is_closed_with_4002_and_the_close_handshake() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    let heard = pair.now;
    pair.run_until(heard + 59_900 * MS);
    assert!(
        pair.server.session().is_open(),
        "QUIC keep-alives do not count, but 60 s have not passed"
    );
    assert_eq!(pair.client.capsule, None);
    pair.run_until(heard + 60_100 * MS);
    assert_eq!(pair.client.capsule, Some((4002, "idle timeout".into())));
    assert!(matches!(
        pair.client.decoded()[..],
        [ServerMessage::Close(ref c)] if c.code == 4002
    ));
    assert!(pair.client.connect_finished);
    // The client ended its side: a clean close, the connection closed with H3_NO_ERROR.
    assert_eq!(
        pair.server.ended(),
        Some(&SessionEnd::Closed {
            code: 4002,
            answered: true
        })
    );
    pair.run_for(2 * S);
    assert_eq!(pair.client.closed_with().map(|(code, _)| code), Some(H3_NO_ERROR));
}

#[test]
fn messages_from_the_client_keep_the_session_open_past_the_idle_timeout() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    for _ in 0..6 {
        pair.run_for(25 * S);
        pair.client.send(&ClientMessage::Command(ClientCommand::Ping));
    }
    pair.run_for(S);
    assert!(pair.server.session().is_open(), "{:?}", pair.server.ended());
    assert_eq!(pair.server.commands().len(), 7);
}

/// A client whose QUIC idle timeout (30 s) is shorter than the gaps between its messages
/// (50 s, inside the session's 60 s): only the server's QUIC keep-alives hold the connection.
fn sparse_client(keep_alive: Option<Duration>) -> Pair {
    let mut pair = Pair::new(Setup {
        keep_alive,
        client_quic_idle: 30 * S,
        ..Setup::default()
    });
    pair.establish();
    for _ in 0..6 {
        pair.run_for(50 * S);
        if pair.client.is_closed() {
            break;
        }
        pair.client.send(&ClientMessage::Command(ClientCommand::Ping));
    }
    pair.run_for(S);
    pair
}

#[test]
fn quic_keep_alives_hold_an_idle_but_alive_session() {
    let mut pair = sparse_client(Some(20 * S));
    assert!(pair.server.session().is_open(), "{:?}", pair.server.ended());
    assert!(pair.client.lost.is_none());
    assert_eq!(pair.server.commands().len(), 7, "the first ping and six more");
    let pings = pair.server.session().connection().stats().frame_tx.ping;
    assert!(pings >= 5, "the server sent {pings} PINGs");
}

#[test]
fn without_keep_alives_the_same_session_times_out() {
    let pair = sparse_client(None);
    assert!(matches!(pair.client.lost, Some(quinn_proto::ConnectionError::TimedOut)));
    assert!(matches!(
        pair.server.ended(),
        Some(SessionEnd::Lost(quinn_proto::ConnectionError::TimedOut))
    ));
}

#[test]
fn the_server_closes_with_its_capsule_and_the_client_answers() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    let now = pair.now;
    pair.server.session().close(
        now,
        CloseRequest {
            code: close_code::SERVICE_RESTART,
            reason: "server shutting down; reconnect",
            limit: 10 * S,
            reconnect: true,
        },
    );
    assert!(!pair
        .server
        .session()
        .deliver(now, &[Outgoing::Control(ServerControl::Pong)]));
    pair.run_for(50 * MS);
    assert!(matches!(
        pair.client.decoded()[..],
        [ServerMessage::Reconnect(_), ServerMessage::Close(ref c)] if c.code == 1012
    ));
    assert_eq!(
        pair.client.capsule,
        Some((1012, "server shutting down; reconnect".into()))
    );
    assert!(pair.client.connect_finished);
    let answered_at = pair.now;
    assert_eq!(
        pair.server.ended(),
        Some(&SessionEnd::Closed {
            code: 1012,
            answered: true
        })
    );
    // The client had a second to close the connection itself; then the server does.
    pair.run_until(answered_at + 900 * MS);
    assert!(pair.client.lost.is_none());
    pair.run_until(answered_at + 1100 * MS);
    assert_eq!(pair.client.closed_with().map(|(code, _)| code), Some(H3_NO_ERROR));
}

#[test]
fn a_client_that_does_not_answer_the_close_is_closed_with_the_code_at_the_limit() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    pair.client.answer_close = false;
    let start = pair.now;
    pair.server.session().close(
        start,
        CloseRequest {
            code: close_code::SLOW,
            reason: "slow consumer; reconnect with since",
            limit: 2 * S,
            reconnect: false,
        },
    );
    pair.run_until(start + 1900 * MS);
    assert_eq!(pair.client.capsule.as_ref().map(|(code, _)| *code), Some(4001));
    assert!(pair.client.lost.is_none());
    assert_eq!(pair.server.ended(), None);
    pair.run_until(start + 2100 * MS);
    assert_eq!(
        pair.client.closed_with(),
        Some((4001, b"slow consumer; reconnect with since".to_vec()))
    );
    assert_eq!(
        pair.server.ended(),
        Some(&SessionEnd::Closed {
            code: 4001,
            answered: false
        })
    );
}

#[test]
fn the_client_closes_with_its_capsule_and_the_server_closes_the_connection() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    pair.client.close_session(1000, "bye");
    pair.run_for(50 * MS);
    assert_eq!(
        pair.server.ended(),
        Some(&SessionEnd::PeerClosed {
            code: Some(1000),
            reason: "bye".into()
        })
    );
    assert_eq!(pair.client.closed_with().map(|(code, _)| code), Some(H3_NO_ERROR));
    pair.run_for(5 * S);
    assert!(
        pair.server.session.is_none(),
        "the connection drained and was forgotten"
    );
}

#[test]
fn an_oversized_control_message_closes_the_session_with_1009() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    // A length prefix of 65,537 (LEB128 81 80 04): one byte over the limit.
    pair.client.send_raw(&[0x81, 0x80, 0x04]);
    pair.run_for(50 * MS);
    assert_eq!(pair.client.capsule.as_ref().map(|(code, _)| *code), Some(1009));
    assert!(matches!(
        pair.server.ended(),
        Some(SessionEnd::Closed { code: 1009, .. })
    ));
}

#[test]
fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    let mut pair = Pair::new(Setup {
        client_stream_window: 8 * 1024,
        ..Setup::default()
    });
    pair.establish();
    pair.client.reads_control = false;
    let start = pair.now;
    let error = Outgoing::Control(ServerControl::error(ErrorCode::BadRequest, "x".repeat(1000)));
    assert!(pair.server.session().wants_more());
    pair.server.session().deliver(start, &vec![error; 20]);
    pair.run_until(start + 14_900 * MS);
    assert!(pair.server.session().is_open());
    assert!(
        !pair.server.session().wants_more(),
        "bytes wait for the client's window"
    );
    pair.run_until(start + 15_100 * MS);
    assert_eq!(pair.server.ended(), Some(&SessionEnd::WriteStalled));
    assert_eq!(pair.client.closed_with(), Some((0, Vec::new())));
}

#[test]
fn a_session_takes_more_deliveries_once_the_client_reads_again() {
    let mut pair = Pair::new(Setup {
        client_stream_window: 8 * 1024,
        ..Setup::default()
    });
    pair.establish();
    pair.client.reads_control = false;
    let now = pair.now;
    let error = Outgoing::Control(ServerControl::error(ErrorCode::BadRequest, "x".repeat(1000)));
    pair.server.session().deliver(now, &vec![error; 12]);
    pair.run_for(S);
    assert!(!pair.server.session().wants_more());
    assert!(!pair.server.events.iter().any(|e| matches!(e, SessionEvent::Writable)));
    pair.client.read_control_now();
    pair.run_for(S);
    assert!(pair.server.session().wants_more());
    assert!(pair.server.events.iter().any(|e| matches!(e, SessionEvent::Writable)));
    assert_eq!(pair.client.messages.len(), 12, "every message arrived");
}

/// A large message (a bracket is about 15 KB) leaves no storage behind once quinn holds it: an
/// idle session keeps at most `KEPT_WRITE_BUFFER` for its control stream, whatever it sent before,
/// through a client window smaller than the message.
#[test]
fn an_idle_session_keeps_no_storage_of_a_large_message_it_sent() {
    let mut pair = subscribed_pair(Setup {
        client_stream_window: 8 * 1024,
        ..Setup::default()
    });
    let now = pair.now;
    let bracket = state_publication(&pair, 1, &format!("\"{}\"", "a".repeat(20_000)));
    assert!(pair.server.session().deliver(now, &[Outgoing::Publication(bracket)]));
    pair.run_for(S);
    assert!(
        pair.client
            .decoded()
            .iter()
            .any(|m| matches!(m, ServerMessage::State(s) if s.version == 1)
                || matches!(m, ServerMessage::AliasedState(s) if s.version == 1)),
        "the client holds the large state: {:?}",
        pair.client.decoded().len()
    );
    assert!(
        !pair.server.session().control_storage_at_least(KEPT_WRITE_BUFFER + 1),
        "the control stream keeps the large message's storage"
    );
}

/// A state of the tests' room whose datagram (quarter stream ID included) is `len` bytes.
fn state_of_datagram_len(pair: &Pair, version: u64, len: usize) -> Outgoing {
    let make = |pad: usize| state_publication(pair, version, &format!("\"{}\"", "a".repeat(pad)));
    let guess = make(len);
    let p = make(len - (guess.session0_datagram().len() - len));
    assert_eq!(p.session0_datagram().len(), len);
    Outgoing::Publication(p)
}

/// docs/PROTOCOL.md, "The HTTP/3 layer": 1,200-byte packets, so with the client's 8-byte
/// connection ID the largest datagram the server sends is 1,162 bytes; `welcome` says so.
#[test]
fn the_largest_datagram_is_1162_bytes_and_welcome_says_so() {
    let mut pair = subscribed_pair(Setup::default());
    pair.client.send(&ClientMessage::Hello);
    pair.run_for(10 * MS);
    let now = pair.now;
    pair.server
        .session()
        .deliver(now, &[Outgoing::Control(ServerControl::Pong)]);
    pair.run_for(10 * MS);
    assert!(
        matches!(
            pair.client.decoded()[2..],
            [ServerMessage::Welcome(ref w), ServerMessage::Pong]
                if w.state_datagrams == "always" && w.datagrams && w.max_datagram == 1162
        ),
        "{:?}",
        pair.client.decoded()
    );
    for (version, len) in [(1, 100), (2, 1162), (3, 1163)] {
        let now = pair.now;
        let state = state_of_datagram_len(&pair, version, len);
        pair.server.session().deliver(now, &[state]);
        pair.run_for(50 * MS);
    }
    let datagrams: Vec<usize> = pair.client.datagrams.iter().map(|d| d.len()).collect();
    assert_eq!(datagrams, [100, 1162], "1,163 bytes went on the stream");
    assert_eq!(pair.client.newest_state("game:1234", ALIAS), Some(3));
}

/// A pair whose server answers a first Initial with a Retry, both links with this latency, jitter
/// (milliseconds) and loss.
fn retried_pair(seed: u64, latency_ms: u64, jitter_ms: u64, loss: f64) -> Pair {
    let mut pair = Pair::new(Setup {
        retry: true,
        seed,
        ..Setup::default()
    });
    for link in [&mut pair.to_server, &mut pair.to_client] {
        link.latency = Duration::from_millis(latency_ms);
        link.jitter = Duration::from_millis(jitter_ms);
        link.loss = loss;
    }
    pair
}

/// A handshake answered with a Retry (as the endpoint answers past `--quic-retry-threshold`)
/// completes through a slow and reordering path, for every one of 200 seeds per path; on the
/// slow one the client sends its Initial again before the Retry arrives and the server retries
/// that one too.
#[test]
fn a_retried_handshake_completes_through_delay_and_reordering() {
    for (latency, jitter) in [(300, 300), (20, 1200)] {
        let mut retried_twice = 0;
        for seed in 1..=200u64 {
            let mut pair = retried_pair(seed, latency, jitter, 0.0);
            let open = pair.run_until_true(Duration::from_secs(10), |p| p.server.established());
            assert!(
                open,
                "latency {latency} ms, jitter {jitter} ms, seed {seed}: {:?}",
                pair.server.events
            );
            assert!(pair.server.retries >= 1, "the server answered with a Retry");
            assert_eq!(pair.server.accepted, 1, "one connection for the client's attempt");
            if pair.server.retries >= 2 {
                retried_twice += 1;
            }
        }
        if latency == 300 {
            assert!(retried_twice > 0, "the slow path had the server retry a resent Initial");
        }
    }
}

/// Under loss a retried handshake can take longer than the session's deadline (the client's
/// probe timer backs off with every loss, and a Retry adds a round trip): in one run of 200
/// seeds, each handshake either opens its session or is closed by the server at
/// `--upgrade-timeout` with the client told (a CONNECTION_CLOSE, not its idle timeout) and the
/// timeout counted; and some do time out.
#[test]
fn a_retried_handshake_either_opens_or_is_closed_at_the_deadline_with_the_client_told() {
    let deadline = Setup::default().session.handshake_timeout;
    let mut timed_out = Vec::new();
    for seed in 1..=200u64 {
        let mut pair = retried_pair(seed, 50, 400, 0.05);
        let start = pair.now;
        let settled = pair.run_until_true(Duration::from_secs(30), |p| {
            p.server.established() || p.client.lost.is_some()
        });
        assert!(settled, "seed {seed}: neither open nor closed after 30 s");
        if pair.server.established() {
            assert_eq!(pair.server.metrics.wt_handshake_timeouts.get(), 0, "seed {seed}");
            continue;
        }
        assert_eq!(pair.server.ended(), Some(&SessionEnd::HandshakeTimeout), "seed {seed}");
        // Before the QUIC handshake is done the close is a transport one; after it, 4002.
        let told = match &pair.client.lost {
            Some(quinn_proto::ConnectionError::ConnectionClosed(_)) => true,
            Some(quinn_proto::ConnectionError::ApplicationClosed(close)) => {
                close.error_code == quinn_proto::VarInt::from_u32(4002)
            }
            _ => false,
        };
        assert!(told, "seed {seed}: closed by the server: {:?}", pair.client.lost);
        assert!(pair.now - start >= deadline, "seed {seed}: not before the deadline");
        assert_eq!(
            pair.server.metrics.wt_handshake_timeouts.get(),
            1,
            "seed {seed}: counted"
        );
        timed_out.push(seed);
    }
    assert!(
        !timed_out.is_empty(),
        "some retried handshakes outlast the deadline under this loss"
    );
}

/// Key updates, the client's, twice: the server opens the next phase's packets with keys it
/// makes only then (`transport::quic_tls`), and the phase after from their secrets; commands and
/// replies flow in each phase.
#[test]
fn after_two_key_updates_commands_and_replies_still_flow() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    for update in 1..=2 {
        pair.client.conn.as_mut().expect("connection").1.force_key_update();
        pair.client.send(&ClientMessage::Command(ClientCommand::Ping));
        pair.run_for(50 * MS);
        assert_eq!(
            pair.server.commands().len(),
            1 + update,
            "update {update}: the server read the ping sent under the new keys"
        );
        let now = pair.now;
        pair.server
            .session()
            .deliver(now, &[Outgoing::Control(ServerControl::Pong)]);
        // Past three PTOs, so that quinn-proto drops the previous keys and takes another update.
        pair.run_for(1000 * MS);
        let pongs = pair
            .client
            .decoded()
            .iter()
            .filter(|m| matches!(m, ServerMessage::Pong))
            .count();
        assert_eq!(
            pongs, update,
            "update {update}: the reply came under the server's new keys"
        );
    }
    assert!(!pair.client.is_closed());
}

/// A client that sends more than its inbound rate has the excess dropped before QUIC reads it:
/// the connection is handed no more bytes than the burst and the rate allow, the drops are
/// counted, and the session goes on (QUIC's loss recovery slows the client; its next command
/// arrives).
#[test]
fn a_client_over_its_inbound_rate_has_the_excess_dropped_unread_and_its_session_goes_on() {
    use super::session::InboundRate;
    const RATE: u32 = 10_000;
    const BURST: u32 = 20_000;
    let mut setup = Setup::default();
    setup.session.inbound = InboundRate {
        bytes_per_second: RATE,
        burst_bytes: BURST,
    };
    let mut pair = Pair::new(setup);
    pair.establish();
    let start = pair.now;
    let handed_before = pair.server.session().connection().stats().udp_rx.bytes;
    assert!(
        handed_before < u64::from(BURST) / 2,
        "the handshake took {handed_before} bytes"
    );
    for _ in 0..200 {
        pair.client.send_datagram(&[0x7f; 1000]);
    }
    pair.run_until(start + 2 * S);
    // What the server sent the client in these 2 s (its acks, mostly) is credited by half.
    let handed = pair.server.session().connection().stats().udp_rx.bytes - handed_before;
    let sent = pair.server.session().connection().stats().udp_tx.bytes;
    let allowed = u64::from(BURST) + 2 * u64::from(RATE) + sent / 2;
    assert!(handed <= allowed, "{handed} bytes handed to QUIC, {allowed} allowed");
    assert!(pair.server.metrics.wt_inbound_dropped.get() > 0);
    // Quiet again, the client's next command arrives.
    pair.run_until(start + 10 * S);
    pair.client
        .send(&ClientMessage::Command(ClientCommand::Unsubscribe { room: room() }));
    assert!(pair.run_until_true(5 * S, |p| p
        .server
        .commands()
        .contains(&ClientCommand::Unsubscribe { room: room() })));
    assert!(pair.server.session().is_open());
}

/// At the default rate a client that sends the most a client does (an `acks` datagram of 64
/// rooms every 5 ms, the most PROTOCOL.md asks for, with aliases of 4 bytes, and a command
/// every 10 ms, the command rate) loses nothing to it.
#[test]
fn a_busy_client_within_the_default_inbound_rate_loses_nothing() {
    let mut pair = Pair::new(Setup::default());
    pair.establish();
    let acks = wire::encode_client(&ClientMessage::Acks(
        (0..64)
            .map(|i| AliasAck {
                alias: 1_000_000 + i,
                version: 1_000_000,
            })
            .collect(),
    ));
    for tick in 0..4_000 {
        pair.client.send_datagram(&acks);
        if tick % 2 == 0 {
            pair.client.send(&ClientMessage::Command(ClientCommand::Ping));
        }
        pair.run_for(5 * MS);
    }
    assert_eq!(pair.server.metrics.wt_inbound_dropped.get(), 0);
    // The load reached the server: 4,000 `acks` of about 390 bytes each.
    let handed = pair.server.session().connection().stats().udp_rx.bytes;
    assert!(handed >= 4_000 * 390, "{handed}");
    assert!(pair.server.session().is_open());
}

/// A client's acks grow with what it receives: half of what the server sends it is added to
/// what it may send, so a client acking a large downstream loses nothing where the rate alone
/// would drop it.
#[test]
fn what_the_server_sends_a_client_adds_to_what_it_may_send() {
    use super::session::InboundRate;
    let mut setup = Setup::default();
    setup.session.inbound = InboundRate {
        bytes_per_second: 2_000,
        burst_bytes: 8_000,
    };
    let mut pair = Pair::new(setup);
    pair.establish();
    let dropped_before = pair.server.metrics.wt_inbound_dropped.get();
    let big = Outgoing::Control(ServerControl::error(ErrorCode::BadRequest, "x".repeat(1000)));
    // 10 s: each 100 ms the server sends 20 KB, the client 2 KB of datagrams (20 KB/s against
    // a rate of 2 KB/s, and half of 200 KB/s sent).
    for _ in 0..100 {
        let now = pair.now;
        pair.server.session().deliver(now, &vec![big.clone(); 20]);
        for _ in 0..2 {
            pair.client.send_datagram(&[0x7f; 1000]);
        }
        pair.run_for(100 * MS);
    }
    assert_eq!(pair.server.metrics.wt_inbound_dropped.get(), dropped_before);
    let handed = pair.server.session().connection().stats().udp_rx.bytes;
    assert!(handed > 10 * 20_000, "{handed}");
}
