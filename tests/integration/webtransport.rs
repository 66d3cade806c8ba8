use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{write_self_signed, wt_codec, LossyRelay, TestServer, WtClient, WtSeen, HANG};

/// States as datagrams from the first one (the default, `after-loss`, sends them on the stream
/// until a session loses a packet).
const STATES_AS_DATAGRAMS: [&str; 2] = ["--wt-state-datagrams", "always"];

#[tokio::test]
async fn the_cert_hash_is_lowercase_hex_and_lets_a_client_connect() {
    let server = TestServer::start(&[]);
    let (status, body) = server.get("/v1/cert-hash").await;
    assert_eq!(status, 200);
    let hash = body["sha256"].as_str().expect("sha256");
    assert_eq!(hash.len(), 64);
    assert!(
        hash.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "{hash}"
    );
    assert_eq!(body["self_signed"], true);
    let mut client = WtClient::connect(&server).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv_stream().await, json!({"type": "pong"}));
}

/// PROTOCOL.md, "Which data uses which path": `hello` is answered with `welcome` (the setting,
/// the route now, the largest datagram), then `pong`; a `ping` gets no `welcome`.
#[tokio::test]
async fn hello_is_answered_with_welcome_then_pong() {
    let server = TestServer::start(&[]);
    let mut client = WtClient::connect(&server).await;
    client.send(json!({"type": "hello"})).await;
    let welcome = client.recv_stream().await;
    assert_eq!(
        (
            welcome["type"].as_str(),
            welcome["state_datagrams"].as_str(),
            welcome["datagrams"].as_bool()
        ),
        (Some("welcome"), Some("after-loss"), Some(false)),
        "{welcome}"
    );
    let max = welcome["max_datagram"].as_u64().expect("max_datagram");
    assert!((1_150..=1_170).contains(&max), "{welcome}");
    assert_eq!(client.recv_stream().await, json!({"type": "pong"}));
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv_stream().await, json!({"type": "pong"}));

    let server = TestServer::start(&STATES_AS_DATAGRAMS);
    let mut client = WtClient::connect(&server).await;
    client.send(json!({"type": "hello"})).await;
    let welcome = client.recv_stream().await;
    assert_eq!(
        (welcome["state_datagrams"].as_str(), welcome["datagrams"].as_bool()),
        (Some("always"), Some(true)),
        "{welcome}"
    );
}

#[tokio::test]
async fn a_state_update_arrives_as_a_datagram_after_an_http_publish() {
    let server = TestServer::start(&STATES_AS_DATAGRAMS);
    let mut client = WtClient::connect(&server).await;
    let subscribed = client.subscribe("game:1234").await;
    assert_eq!(
        (subscribed["version"].as_u64(), subscribed["seq"].as_u64()),
        (Some(0), Some(0))
    );
    let receipt = server.publish_state("game:1234", r#"{"home":42,"away":40}"#).await;
    match client.next().await {
        WtSeen::Datagram(state) => {
            assert_eq!(state["type"], "state");
            assert_eq!(state["room"], "game:1234");
            assert_eq!(state["version"], 1);
            assert_eq!(state["ts"], receipt["ts"]);
            assert_eq!(state["data"], r#"{"home":42,"away":40}"#);
        }
        other => panic!("expected a datagram, got {other:?}"),
    }
    // The reply and the state: counted after they were sent, so awaited.
    server
        .await_metric(
            "courtside_messages_out_total{transport=\"webtransport\"}",
            ">= 2",
            |v| v >= 2.0,
        )
        .await;
}

#[tokio::test]
async fn the_current_state_on_joining_comes_over_the_stream() {
    let server = TestServer::start(&[]);
    server.publish_state("league:12", r#"{"leader":"team:301"}"#).await;
    let mut client = WtClient::connect(&server).await;
    client.send(json!({"type": "subscribe", "room": "league:12"})).await;
    assert_eq!(client.recv_stream().await["version"], 1);
    let state = client.recv_stream().await;
    assert_eq!(
        (state["type"].as_str(), state["version"].as_u64()),
        (Some("state"), Some(1))
    );
    assert_eq!(state["data"], r#"{"leader":"team:301"}"#);
}

#[tokio::test]
async fn events_arrive_over_the_stream_in_order_and_since_recovers() {
    let server = TestServer::start(&[]);
    for i in 1..=5 {
        server.publish_event("bracket:77", &format!(r#"{{"round":{i}}}"#)).await;
    }
    let mut client = WtClient::connect(&server).await;
    client
        .send(json!({"type": "subscribe", "room": "bracket:77", "since": 2}))
        .await;
    let subscribed = client.recv_stream().await;
    assert_eq!(
        (subscribed["recovered"].as_bool(), subscribed["seq"].as_u64()),
        (Some(true), Some(5))
    );
    for seq in 3..=5 {
        assert_eq!(client.recv_stream().await["seq"], seq);
    }
    for i in 6..=40 {
        server.publish_event("bracket:77", &i.to_string()).await;
    }
    for seq in 6..=40 {
        let event = client.recv_stream().await;
        assert_eq!(
            (event["type"].as_str(), event["seq"].as_u64()),
            (Some("event"), Some(seq))
        );
        assert_eq!(event["data"], seq.to_string());
    }
    let mut late = WtClient::connect(&server).await;
    late.send(json!({"type": "subscribe", "room": "bracket:77", "since": 1, "epoch": "another-epoch"}))
        .await;
    assert_eq!(late.recv_stream().await["recovered"], false);
}

#[tokio::test]
async fn a_state_too_large_for_a_datagram_goes_over_the_stream() {
    let server = TestServer::start(&[]);
    let mut client = WtClient::connect(&server).await;
    client.subscribe("bracket:9").await;
    let big = format!(r#"{{"teams":"{}"}}"#, "t".repeat(4000));
    server.publish_state("bracket:9", &big).await;
    let state = client.recv_stream().await;
    assert_eq!(
        (state["type"].as_str(), state["version"].as_u64()),
        (Some("state"), Some(1))
    );
    assert_eq!(state["data"], big);
}

#[tokio::test]
async fn bad_control_messages_get_documented_errors_and_the_session_keeps_working() {
    // PROTOCOL.md's type bytes: 0x01 subscribe, 0x03 ping.
    const SUBSCRIBE: u8 = 0x01;
    const PING: u8 = 0x03;
    let server = TestServer::start(&[]);
    let mut client = WtClient::connect(&server).await;
    let cases: [(&[u8], u64); 5] = [
        (&[0x7f], 101),
        (&[], 101),
        (&[SUBSCRIBE], 100),
        (&[SUBSCRIBE, 0x03, b'a', b' ', b'b', 0x00, 0x00], 102),
        (&[PING, 0x01], 100),
    ];
    for (message, code) in cases {
        client.send_raw(message).await;
        let error = client.recv_stream().await;
        assert_eq!(error["type"], "error", "{message:?}");
        assert_eq!(error["code"].as_u64(), Some(code), "{message:?}: {error}");
    }
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv_stream().await["type"], "pong");
}

#[tokio::test]
async fn an_oversized_control_message_closes_the_session_with_1009() {
    let server = TestServer::start(&STATES_AS_DATAGRAMS);
    let mut bystander = WtClient::connect(&server).await;
    bystander.subscribe("game:1").await;
    let mut client = WtClient::connect(&server).await;
    // A length prefix announcing 1 MiB: refused before the body arrives.
    client.send_bytes(&[0x80, 0x80, 0x40]).await;
    let close = client.recv_stream().await;
    assert_eq!(
        close,
        json!({"type": "close", "code": 1009, "reason": "message larger than 65536 bytes"})
    );
    server.publish_state("game:1", "1").await;
    assert!(matches!(bystander.next().await, WtSeen::Datagram(state) if state["version"] == 1));
}

#[tokio::test]
async fn websocket_and_webtransport_clients_share_rooms() {
    let server = TestServer::start(&[]);
    let mut ws = server.connect().await;
    ws.subscribe("game:5").await;
    let mut wt = WtClient::connect(&server).await;
    wt.subscribe("game:5").await;
    server.publish_event("game:5", r#"{"foul":"home"}"#).await;
    assert_eq!(ws.recv().await["seq"], 1);
    assert_eq!(wt.recv_stream().await["seq"], 1);
    assert_eq!(server.get("/v1/rooms/game:5").await.1["subscribers"], 2);
}

/// Through relays that drop 30 % of the packets in both directions, every client ends on the
/// newest version: lost datagrams are repaired. (How long it took is printed, not asserted: a
/// debug build on a loaded machine says nothing about the design target of 1 s; the bench
/// measures that.)
#[tokio::test]
async fn under_30_percent_loss_every_client_ends_on_the_newest_state() {
    let (times, datagrams, server) = converge_under_30_percent_loss(&STATES_AS_DATAGRAMS).await;
    eprintln!("convergence after the last publish under 30% loss: {times:?}");
    assert!(datagrams > 0, "no state came as a datagram");
    // The clients acknowledged datagram states. (Whether a repair had to resend one depends on
    // which packets the relays dropped: a lost state superseded by the next publish 5 ms later
    // needs none, and in about one run in fifty every last state got through; the resend itself
    // is asserted deterministically in virtual time, `transport::wt::tests`.)
    server
        .await_metric("courtside_repair_acks_total", ">= 1", |v| v >= 1.0)
        .await;
}

#[tokio::test]
async fn the_endpoint_loop_counts_the_time_it_works() {
    // Named, not left to the default: the suite also runs with COURTSIDE_WT_ENGINE=quinn.
    let server = TestServer::start(&["--wt-engine", "proto"]);
    let mut client = WtClient::connect(&server).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv_stream().await, json!({"type": "pong"}));
    // The handshake, the ping and its reply were work: more than none, less than the test ran.
    server
        .await_metric(
            "courtside_webtransport_loop_busy_seconds_total{endpoint_loop=\"0\"}",
            "> 0",
            |v| v > 0.0 && v < 60.0,
        )
        .await;
}

#[tokio::test]
async fn with_two_endpoint_loops_every_session_is_served_and_one_whose_address_changes_follows() {
    let server = TestServer::start(&["--wt-engine", "proto", "--wt-loops", "2"]);
    let hash = server.cert_hash().await;
    let wt = server.wt.expect("webtransport enabled");
    // Eight clients from eight ports: Linux spreads them over both loops' sockets.
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut client = WtClient::connect_to(wt, &hash, true).await;
        client.subscribe("game:loops").await;
        clients.push(client);
    }
    let relay = LossyRelay::start(wt, 0.0, 1).await;
    let mut moving = WtClient::connect_to(relay.addr, &hash, true).await;
    moving.subscribe("game:loops").await;
    // Each loop's series, by the loop a datagram was handed to; both there from the start.
    let per_loop = |name: &str| [0, 1].map(|i| format!("courtside_webtransport_{name}_total{{endpoint_loop=\"{i}\"}}"));
    let forwarded = per_loop("datagrams_forwarded");
    for series in per_loop("loop_busy_seconds").iter().chain(&forwarded) {
        server.await_metric(series, ">= 0", |v| v >= 0.0).await;
    }
    // Each new port lands on either socket (the kernel hashes the address); until one landed on
    // the loop that does not own the session and was handed on (1 in 2^32 never does in 32).
    let mut version = 0;
    for _ in 0..32 {
        relay.rebind().await;
        version += 1;
        server
            .publish_state("game:loops", &json!({"home": version}).to_string())
            .await;
        await_version(&mut moving, version).await;
        if server.metric(&forwarded[0]).await + server.metric(&forwarded[1]).await > 0.0 {
            break;
        }
    }
    // Handed to one loop, the session's: the other loop's count stays 0.
    let counts = [server.metric(&forwarded[0]).await, server.metric(&forwarded[1]).await];
    assert!(
        counts.iter().filter(|count| **count > 0.0).count() == 1,
        "forwarded to exactly one loop: {counts:?}"
    );
    // After the handing on, the session still gets what is published, as does everyone else.
    version += 1;
    server
        .publish_state("game:loops", &json!({"home": version}).to_string())
        .await;
    await_version(&mut moving, version).await;
    for client in &mut clients {
        await_version(client, version).await;
    }
    for series in per_loop("forward_drops") {
        assert_eq!(server.metric(&series).await, 0.0, "{series}");
    }
}

/// Reads `client`'s messages until a state of `version` (or a later one).
async fn await_version(client: &mut WtClient, version: u64) {
    loop {
        match client.next().await {
            WtSeen::Datagram(state) | WtSeen::Stream(state)
                if state["type"] == "state" && state["version"].as_u64() >= Some(version) =>
            {
                return
            }
            WtSeen::Closed(code) => panic!("closed {code:?} before version {version}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn with_two_endpoint_loops_the_drain_tells_every_session_to_reconnect() {
    told_to_reconnect_on_shutdown(&["--wt-engine", "proto", "--wt-loops", "2"]).await;
}

#[tokio::test]
async fn with_states_as_datagrams_after_loss_a_clean_session_gets_states_over_the_stream() {
    let server = TestServer::start(&["--wt-state-datagrams", "after-loss"]);
    let mut client = WtClient::connect(&server).await;
    client.subscribe("game:1234").await;
    server.publish_state("game:1234", r#"{"home":1}"#).await;
    match client.next().await {
        WtSeen::Stream(state) => {
            assert_eq!(state["type"], "state");
            assert_eq!(state["version"], 1);
        }
        other => panic!("expected the state over the stream, got {other:?}"),
    }
}

#[tokio::test]
async fn with_states_as_datagrams_after_loss_lossy_sessions_switch_to_datagrams_and_converge() {
    let (times, datagram_states, _) = converge_under_30_percent_loss(&["--wt-state-datagrams", "after-loss"]).await;
    eprintln!("convergence under 30% loss, datagrams after loss: {times:?}");
    assert!(datagram_states > 0, "no session switched to datagrams");
}

/// Six clients behind 30 % lossy relays follow one room through 40 state publishes, each until
/// it holds the newest version (the test fails if one does not within `HANG`); returns how long
/// after the last publish each did (for the log), how many states came as datagrams, and the
/// server.
pub(crate) async fn converge_under_30_percent_loss(server_args: &[&str]) -> (Vec<Duration>, u64, TestServer) {
    const CLIENTS: u64 = 6;
    const PUBLISHES: u64 = 40;
    let server = TestServer::start(server_args);
    let hash = server.cert_hash().await;
    let wt = server.wt.expect("wt");
    let mut clients = Vec::new();
    let mut relays = Vec::new();
    for i in 0..CLIENTS {
        let relay = LossyRelay::start(wt, 0.3, 0x5eed + i).await;
        let mut client = WtClient::connect_to(relay.addr, &hash, true).await;
        client.subscribe("game:lossy").await;
        relays.push(relay);
        clients.push(client);
    }
    for v in 1..=PUBLISHES {
        server
            .publish_state("game:lossy", &json!({"home": v}).to_string())
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last_publish = Instant::now();
    let mut tasks = Vec::new();
    for mut client in clients {
        tasks.push(tokio::spawn(async move {
            let (mut held, mut datagrams) = (0, 0);
            while held < PUBLISHES {
                let state = match client.next().await {
                    WtSeen::Datagram(v) => {
                        datagrams += 1;
                        v
                    }
                    WtSeen::Stream(v) => v,
                    WtSeen::Closed(code) => panic!("session closed ({code:?})"),
                };
                if state["type"] == "state" {
                    held = held.max(state["version"].as_u64().expect("version"));
                }
            }
            (last_publish.elapsed(), datagrams)
        }));
    }
    let mut times = Vec::new();
    let mut datagram_states = 0;
    for task in tasks {
        let (time, datagrams) = tokio::time::timeout(HANG, task)
            .await
            .expect("converged")
            .expect("client task");
        times.push(time);
        datagram_states += datagrams;
    }
    (times, datagram_states, server)
}

#[tokio::test]
async fn a_webtransport_client_is_told_to_reconnect_on_shutdown() {
    told_to_reconnect_on_shutdown(&[]).await;
}

/// A session on a server started with `server_args` is told to reconnect on SIGTERM, closed with
/// 1012, and the server exits 0 once it closes.
pub(crate) async fn told_to_reconnect_on_shutdown(server_args: &[&str]) {
    let mut server = TestServer::start(&[server_args, &["--drain-timeout", "20s"]].concat());
    let mut client = WtClient::connect(&server).await;
    client.subscribe("game:1").await;
    server.sigterm();
    assert_eq!(
        client.recv_stream().await,
        json!({"type": "reconnect", "reason": "shutdown"})
    );
    assert_eq!(client.recv_stream().await["code"], 1012);
    client.connection.close(wtransport::VarInt::from_u32(0), b"bye");
    assert_eq!(server.wait_exit().await.code(), Some(0));
    assert_eq!(server.logs_with("drained; every connection closed").len(), 1);
}

/// New certificate files are picked up on SIGHUP, or by the file check, without dropping open
/// sessions.
#[tokio::test]
async fn certificates_reload_on_sighup_without_dropping_sessions() {
    certificate_reload(true, &[]).await;
}

#[tokio::test]
async fn certificates_reload_when_the_files_change() {
    certificate_reload(false, &[]).await;
}

/// With two loops, the new hash is published once both serve the new certificate: clients that
/// connect with it reach either loop.
#[tokio::test]
async fn with_two_endpoint_loops_certificates_reload_in_every_loop() {
    certificate_reload(false, &["--wt-engine", "proto", "--wt-loops", "2"]).await;
}

async fn certificate_reload(sighup: bool, extra: &[&str]) {
    let dir = std::env::temp_dir().join(format!(
        "courtside-certs-{}-{sighup}-{}",
        std::process::id(),
        extra.len()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let first = write_self_signed(&cert, &key);
    let interval = if sighup { "1h" } else { "100ms" };
    let server = TestServer::start(
        &[
            &[
                "--cert",
                cert.to_str().expect("path"),
                "--key",
                key.to_str().expect("path"),
                "--cert-check-interval",
                interval,
            ],
            extra,
        ]
        .concat(),
    );
    let (_, body) = server.get("/v1/cert-hash").await;
    assert_eq!(
        (body["sha256"].as_str(), body["self_signed"].as_bool()),
        (Some(first.as_str()), Some(false))
    );
    let mut old = WtClient::connect(&server).await;
    old.subscribe("game:1").await;

    let second = write_self_signed(&cert, &key);
    assert_ne!(first, second);
    if sighup {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &server.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
    let deadline = tokio::time::Instant::now() + HANG;
    while server.cert_hash().await != second {
        assert!(tokio::time::Instant::now() < deadline, "certificate not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several, from as many ports: with several loops they reach each one.
    let mut new = Vec::new();
    for _ in 0..6 {
        let mut client = WtClient::connect(&server).await;
        client.subscribe("game:1").await;
        new.push(client);
    }
    server.publish_event("game:1", "1").await;
    assert_eq!(old.recv_stream().await["seq"], 1);
    for client in &mut new {
        assert_eq!(client.recv_stream().await["seq"], 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
/// A client's ack datagram reaches the session's repair: the server counts it.
#[tokio::test]
async fn an_ack_datagram_is_received_by_the_session() {
    let server = TestServer::start(&STATES_AS_DATAGRAMS);
    let hash = server.cert_hash().await;
    let mut client = WtClient::connect_to(server.wt.expect("wt"), &hash, true).await;
    client.subscribe("game:3").await;
    server.publish_state("game:3", "1").await;
    match client.next().await {
        WtSeen::Datagram(state) => assert_eq!(state["version"], 1),
        other => panic!("expected a datagram, got {other:?}"),
    }
    // The client acked on receipt; the ack travels on its own, so await the server's count.
    server
        .await_metric("courtside_repair_acks_total", ">= 1", |v| v >= 1.0)
        .await;
}

/// A client that never acknowledges gets the state again as datagrams and once over the stream.
#[tokio::test]
async fn an_unacknowledged_state_is_resent_and_once_sent_reliably() {
    let server = TestServer::start(&STATES_AS_DATAGRAMS);
    let hash = server.cert_hash().await;
    let mut client = WtClient::connect_to(server.wt.expect("wt"), &hash, false).await;
    client.subscribe("game:2").await;
    server.publish_state("game:2", "7").await;
    let (mut datagrams, mut streamed) = (0, 0);
    while datagrams < 3 || streamed < 1 {
        match client.next().await {
            WtSeen::Datagram(state) => {
                assert_eq!(state["version"], 1);
                datagrams += 1;
            }
            WtSeen::Stream(state) => {
                assert_eq!(
                    (state["type"].as_str(), state["version"].as_u64()),
                    (Some("state"), Some(1))
                );
                streamed += 1;
            }
            WtSeen::Closed(code) => panic!("closed {code:?}"),
        }
    }
    assert_eq!(streamed, 1);
    server.await_count("courtside_repair_stream_total", 1.0).await;
    server
        .await_metric("courtside_repair_datagrams_total", ">= 2", |v| v >= 2.0)
        .await;
}

/// The connection IDs in a QUIC packet read off the wire: a long header's (server to client:
/// the server's own, its source ID) or a short header's destination ID (client to server: an
/// ID the server issued), taking `short_len` bytes for the latter.
fn server_connection_id(to_server: bool, packet: &[u8], short_len: usize) -> Option<Vec<u8>> {
    let first = *packet.first()?;
    if first & 0x80 != 0 {
        // Long header: flags, version (4), DCID length and DCID, SCID length and SCID.
        let dcid_len = *packet.get(5)? as usize;
        let scid_at = 6 + dcid_len;
        let scid_len = *packet.get(scid_at)? as usize;
        let scid = packet.get(scid_at + 1..scid_at + 1 + scid_len)?;
        let dcid = packet.get(6..6 + dcid_len)?;
        // The client's first Initial names an ID of its own choosing; the server's packets
        // carry the server's as their source.
        return Some(if to_server { dcid.to_vec() } else { scid.to_vec() }).filter(|_| !to_server);
    }
    if to_server {
        return packet.get(1..1 + short_len).map(<[u8]>::to_vec);
    }
    None
}

/// Runs one session through a relay that records packets, and returns the connection IDs the
/// server used: its long-header source IDs and the client's short-header destination IDs.
async fn connection_ids_seen(server_args: &[&str], short_len: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let server = TestServer::start(server_args);
    let hash = server.cert_hash().await;
    let relay = LossyRelay::start(server.wt.expect("wt"), 0.0, 1).await;
    let mut client = WtClient::connect_to(relay.addr, &hash, true).await;
    client.subscribe("game:cid").await;
    for v in 1..=3 {
        server.publish_state("game:cid", &v.to_string()).await;
    }
    loop {
        match client.next().await {
            WtSeen::Datagram(state) | WtSeen::Stream(state) if state["version"] == 3 => break,
            WtSeen::Closed(code) => panic!("closed {code:?}"),
            _ => {}
        }
    }
    let (mut long, mut short) = (Vec::new(), Vec::new());
    for (to_server, packet) in relay.packets() {
        let Some(cid) = server_connection_id(to_server, &packet, short_len) else {
            continue;
        };
        if to_server {
            short.push(cid);
        } else if packet[0] & 0x80 != 0 {
            long.push(cid);
        }
    }
    (long, short)
}

#[tokio::test]
async fn with_a_quic_server_id_every_connection_id_the_server_issues_carries_it() {
    let (long, short) = connection_ids_seen(&["--quic-server-id", "0x0123456789abcdef"], 16).await;
    assert!(!long.is_empty() && !short.is_empty(), "long {long:?} short {short:?}");
    let id = courtside::quic_lb::QuicServerId([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
    for cid in long.iter().chain(&short) {
        assert_eq!(cid.len(), 16, "{cid:02x?}");
        assert_eq!(cid[0] >> 5, 0, "config rotation 0b000: {cid:02x?}");
        assert_eq!(courtside::quic_lb::server_id_of(cid), Some(id), "{cid:02x?}");
    }
}

#[tokio::test]
async fn without_a_quic_server_id_connection_ids_are_random() {
    let (long, short) = connection_ids_seen(&[], 8).await;
    assert!(!long.is_empty() && !short.is_empty());
    for cid in &long {
        assert_eq!(cid.len(), 8, "8-byte random IDs: {cid:02x?}");
        assert_eq!(courtside::quic_lb::server_id_of(cid), None);
    }
}

/// QUIC's keep-alives (the client's, every 2 s here) keep the connection up, but not the
/// session: a client that sends nothing for the idle timeout is closed with 4002.
#[tokio::test]
async fn a_silent_session_is_closed_with_4002_although_quic_stays_alive() {
    let server = TestServer::start(&["--idle-timeout", "3s", "--ping-interval", "1s"]);
    let mut client = WtClient::connect(&server).await;
    client.subscribe("game:quiet").await;
    let close = client.recv_stream().await;
    assert_eq!(close, json!({"type": "close", "code": 4002, "reason": "idle timeout"}));
    // The session's close capsule carries the code too (the client reads it as the session's
    // close; its control stream just ends).
    let mut codes = Vec::new();
    while codes.len() < 2 {
        if let WtSeen::Closed(code) = client.next().await {
            codes.push(code);
        }
    }
    assert!(codes.contains(&Some(4002)), "{codes:?}");
}

/// Over WebTransport as over WebSocket, a client that keeps sending over its command rate gets
/// one 104, then no answer for a burst's worth more, then the session's close with 1008.
#[tokio::test]
async fn a_command_flood_over_webtransport_gets_one_104_then_close_1008() {
    let server = TestServer::start(&["--command-rate", "0.001", "--command-burst", "3"]);
    let mut client = WtClient::connect(&server).await;
    for _ in 0..8 {
        client.send(json!({"type": "ping"})).await;
    }
    for _ in 0..3 {
        assert_eq!(client.recv_stream().await["type"], "pong");
    }
    assert_eq!(client.recv_stream().await["code"], 104);
    assert_eq!(
        client.recv_stream().await,
        json!({"type": "close", "code": 1008, "reason": "too many commands over the rate"})
    );
    server
        .await_count("courtside_errors_total{code=\"1008\",name=\"command_flood\"}", 1.0)
        .await;
}

/// A WebTransport subscriber that stops reading while events pile up is closed with 4001: its
/// control stream takes nothing more, its queue overflows, and the session closes though
/// nothing more will ever be written to it.
#[tokio::test]
async fn a_webtransport_subscriber_that_stops_reading_is_closed_as_slow() {
    // A write timeout longer than the test's wait: only the overflow's close can end it in time
    // (the write timeout would drop it with QUIC code 0, and count no slow disconnect).
    let server = TestServer::start(&["--queue-messages", "16", "--write-timeout", "120s"]);
    let hash = server.cert_hash().await;
    let crate::util::WtOpened {
        endpoint: _endpoint,
        connection,
        mut send,
        mut recv,
    } = crate::util::wt_open(server.wt.expect("webtransport enabled"), &hash).await;
    let subscribe = json!({"type": "subscribe", "room": "bracket:slow"});
    send.write_all(&wt_codec::frame(&wt_codec::encode_client(&subscribe)))
        .await
        .expect("write the subscribe");
    // Reads up to `subscribed`, then never again (the stream stays open).
    let mut frames = wt_codec::Frames::default();
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(HANG, async {
        loop {
            while let Some(frame) = frames.next().expect("framing") {
                if wt_codec::decode_server(&frame).expect("a message")["type"] == "subscribed" {
                    return;
                }
            }
            let n = recv.read(&mut buf).await.expect("read").expect("the stream open");
            frames.extend(&buf[..n]);
        }
    })
    .await
    .expect("subscribed in time");
    // Events of 64 KiB until the session closes: the client's stream window (about 1.2 MB) and
    // then its queue of 16 fill within a few dozen.
    let padding = "y".repeat(64 * 1024);
    let closed = connection.closed();
    tokio::pin!(closed);
    let mut published = 0;
    let error = tokio::time::timeout(4 * HANG, async {
        loop {
            let event = json!({"n": published, "pad": padding}).to_string();
            tokio::select! {
                error = &mut closed => break error,
                _ = server.publish_event("bracket:slow", &event), if published < 600 => published += 1,
            }
        }
    })
    .await
    .expect("the session closed in time");
    // wtransport answers the server's close capsule by closing the connection itself, so it
    // reports its own close; the server's count says why.
    match error {
        wtransport::error::ConnectionError::LocallyClosed => {}
        wtransport::error::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.code().into_inner(), 4001, "{close:?}")
        }
        other => panic!("closed otherwise than by the server's close: {other:?}"),
    }
    server
        .await_count("courtside_slow_disconnects_total{transport=\"webtransport\"}", 1.0)
        .await;
    drop(recv);
}

/// A session whose control stream carries no first message within the upgrade timeout is
/// closed (4002), though its QUIC connection, the CONNECT and the stream were all fine.
#[tokio::test]
async fn a_control_stream_without_a_first_message_is_closed() {
    use wtransport::error::{ConnectingError, ConnectionError};
    let server = TestServer::start(&["--upgrade-timeout", "2s"]);
    let endpoint = crate::util::wt_endpoint(&server.cert_hash().await);
    let url = format!("https://{}/wt", server.wt.expect("wt"));
    // The timeout covers the handshake and the CONNECT too: on a loaded machine it may end the
    // session before the control stream is open. Whichever step it interrupts, the session
    // ends with 4002 and nothing else.
    let closed = tokio::time::timeout(HANG, async {
        let connection = match endpoint.connect(&url).await {
            Ok(connection) => connection,
            Err(ConnectingError::ConnectionError(error)) => return error,
            Err(other) => panic!("the session failed otherwise: {other}"),
        };
        // The control stream is opened (its WebTransport header goes out) and stays silent.
        let _control = match connection.open_bi().await {
            Ok(opening) => opening.await.ok(),
            Err(_) => None,
        };
        connection.closed().await
    })
    .await
    .expect("closed in time");
    match closed {
        ConnectionError::ApplicationClosed(close) => assert_eq!(close.code().into_inner(), 4002),
        other => panic!("closed otherwise: {other}"),
    }
    server
        .await_metric("courtside_connections{transport=\"webtransport\"}", "= 0", |v| v == 0.0)
        .await;
    server
        .await_metric("courtside_webtransport_handshake_timeouts_total", "= 1", |v| v == 1.0)
        .await;
}

/// `--quic-retry-threshold 0`: every new QUIC connection is first answered with a Retry; a
/// client that echoes the token (wtransport's quinn does) gets its session as usual. Below the
/// default threshold nothing is retried.
#[tokio::test]
async fn a_handshake_flood_is_met_with_retry_and_real_clients_still_connect() {
    let server = TestServer::start(&["--quic-retry-threshold", "0"]);
    let mut client = WtClient::connect(&server).await;
    client.subscribe("game:retry").await;
    server.publish_event("game:retry", "\"after a retry\"").await;
    loop {
        if let WtSeen::Stream(message) = client.next().await {
            if message["type"] == "event" {
                assert_eq!(message["data"], "\"after a retry\"");
                break;
            }
        }
    }
    server.await_count("courtside_quic_retries_total", 1.0).await;

    // A Retry comes before the handshake: once the session is up, none can be counted any more.
    let quiet = TestServer::start(&[]);
    let mut client = WtClient::connect(&quiet).await;
    client.subscribe("game:quiet").await;
    assert_eq!(quiet.metric("courtside_quic_retries_total").await, 0.0);
}

/// `--quic-server-id ecs-task`: the ID is derived from the task ARN the ECS task metadata
/// endpoint (`ECS_CONTAINER_METADATA_URI_V4`) gives, as deploy/'s registration function derives
/// it. The endpoint here is a stand-in serving the documented `/task` body on loopback (on a
/// runtime thread of its own: `TestServer::start` blocks while it waits for the addresses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quic_server_id_can_come_from_the_ecs_task_metadata() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = vec![0u8; 4096];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let asked = String::from_utf8_lossy(&request[..n]).to_string();
            let body = if asked.starts_with("GET /v4/abc/task ") {
                r#"{"Cluster":"courtside","TaskARN":"arn:aws:ecs:us-west-2:111122223333:task/courtside/0123456789abcdef0123456789abcdef","Family":"courtside"}"#
            } else {
                "{}"
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    let metadata = format!("http://{addr}/v4/abc");
    let server = TestServer::start_with_env(
        &["--quic-server-id", "ecs-task"],
        &[("ECS_CONTAINER_METADATA_URI_V4", &metadata)],
    );
    let derived = server.await_log("derived from the ECS task").await;
    assert_eq!(derived["quic_server_id"], "0x05cd5e4324e6ab56", "{derived}");
    // Sessions work with it.
    let mut client = WtClient::connect(&server).await;
    client.subscribe("game:ecs").await;
}
