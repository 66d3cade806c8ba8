//! The quinn engine (`--wt-engine quinn`: quinn's endpoint and a task per session, the default
//! before Courtside's own endpoint loop took its place) against the same clients and
//! expectations as the default one. The whole WebTransport, limits, tokens, shutdown and delivery
//! suites, and the Chromium tests in tests/browser, also pass with `COURTSIDE_WT_ENGINE=quinn`.

use serde_json::json;

use crate::util::{TestServer, WtClient, WtSeen};
use crate::webtransport::{converge_under_30_percent_loss, told_to_reconnect_on_shutdown};

const QUINN: [&str; 2] = ["--wt-engine", "quinn"];

#[tokio::test]
async fn commands_replies_and_state_datagrams_flow_on_the_quinn_engine() {
    let server = TestServer::start(&[&QUINN[..], &["--wt-state-datagrams", "always"]].concat());
    let mut client = WtClient::connect(&server).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv_stream().await, json!({"type": "pong"}));
    client.subscribe("game:1234").await;
    server.publish_state("game:1234", r#"{"home":42}"#).await;
    match client.next().await {
        WtSeen::Datagram(state) => assert_eq!(
            (state["type"].as_str(), state["version"].as_u64()),
            (Some("state"), Some(1))
        ),
        other => panic!("expected a datagram, got {other:?}"),
    }
    server
        .await_metric("courtside_connections{transport=\"webtransport\"}", "= 1", |v| v == 1.0)
        .await;
}

#[tokio::test]
async fn a_silent_session_on_the_quinn_engine_is_closed_with_4002() {
    let server = TestServer::start(&[&QUINN[..], &["--idle-timeout", "3s", "--ping-interval", "1s"]].concat());
    let mut client = WtClient::connect(&server).await;
    client.subscribe("game:quiet").await;
    assert_eq!(
        client.recv_stream().await,
        json!({"type": "close", "code": 4002, "reason": "idle timeout"})
    );
}

#[tokio::test]
async fn the_quinn_engine_drains_on_shutdown() {
    told_to_reconnect_on_shutdown(&QUINN).await;
}

#[tokio::test]
async fn under_30_percent_loss_clients_of_the_quinn_engine_end_on_the_newest_state() {
    let (times, datagrams, server) =
        converge_under_30_percent_loss(&[&QUINN[..], &["--wt-state-datagrams", "always"]].concat()).await;
    eprintln!("quinn engine, convergence after the last publish under 30% loss: {times:?}");
    assert!(datagrams > 0, "no state came as a datagram");
    // Acknowledged (a repair depends on the drop pattern: see the default engine's test).
    server
        .await_metric("courtside_repair_acks_total", ">= 1", |v| v >= 1.0)
        .await;
}
