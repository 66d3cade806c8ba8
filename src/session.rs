//! One client's protocol session, whatever its transport: turns commands into hub calls and
//! replies, enforces the per-connection limits, and unsubscribes everything when dropped.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::admission::{Admission, Admitted, CommandBudget, RecoveryBudget};
use crate::core::{ClientCommand, CommandError, ErrorCode, RoomName, ServerControl};
use crate::hub::{Hub, HubError, Subscriber};
use crate::registry::Registry;
use crate::tokens::Claims;

/// Per-connection limits on what a client controls (the command rate is admission's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Rooms one connection may be subscribed to at once.
    pub max_subscriptions: usize,
}

impl SessionLimits {
    pub fn from_config(config: &crate::config::ServeConfig) -> Self {
        Self {
            max_subscriptions: config.connection.max_subscriptions,
        }
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self { max_subscriptions: 256 }
    }
}

/// A client's subscriptions and the replies it is owed.
#[derive(Debug)]
pub struct Session {
    hub: Hub,
    subscriber: Arc<Subscriber>,
    /// Rooms the client asked for. Shared with subscribes still loading from Redis, which join
    /// the hub only if the room is still wanted (under this lock), so nothing leaks.
    rooms: Arc<Mutex<HashSet<RoomName>>>,
    registry: Arc<dyn Registry>,
    limits: SessionLimits,
    /// The command rate admission allows this connection.
    budget: CommandBudget,
    /// The recovered event bytes admission allows this connection (shared with subscribes
    /// still loading from Redis).
    recovery: Arc<Mutex<RecoveryBudget>>,
    /// Who may listen to what.
    admission: Admission,
    /// The connection's token, once an `auth` was accepted (boxed: most connections have none).
    claims: Option<Box<Claims>>,
    /// Set by the server while it drains: no new subscriptions.
    draining: Arc<AtomicBool>,
    /// The client floods commands over its rate (`admit`).
    flooding: bool,
}

impl Session {
    /// A session opened at `now_ms`: its command and recovery budgets come from `admission`.
    pub fn new(
        hub: Hub,
        registry: Arc<dyn Registry>,
        subscriber: Arc<Subscriber>,
        limits: SessionLimits,
        admission: Admission,
        draining: Arc<AtomicBool>,
        now_ms: u64,
    ) -> Self {
        Self {
            hub,
            subscriber,
            rooms: Arc::new(Mutex::new(HashSet::new())),
            registry,
            limits,
            budget: admission.command_budget(now_ms),
            recovery: Arc::new(Mutex::new(admission.recovery_budget(now_ms))),
            admission,
            claims: None,
            draining,
            flooding: false,
        }
    }

    /// When the connection's token expires (ms since the Unix epoch): the driver closes it then
    /// with 4003 unless an `auth` refreshed it.
    pub fn token_expires_ms(&self) -> Option<u64> {
        self.claims.as_ref().map(|c| c.exp.saturating_mul(1000))
    }

    pub fn subscription_count(&self) -> usize {
        self.wanted().len()
    }

    fn wanted(&self) -> MutexGuard<'_, HashSet<RoomName>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles one parsed (or unparseable) client message; every reply goes to the queue.
    pub fn handle(&mut self, command: Result<ClientCommand, CommandError>, now_ms: u64) {
        if !self.admit(now_ms) {
            return;
        }
        let command = match command {
            Ok(command) => command,
            Err(error) => return self.reply_error(error.code(), error.to_string(), None),
        };
        match command {
            ClientCommand::Subscribe {
                room,
                since,
                epoch,
                request,
                delta,
            } => self.subscribe(
                room,
                Recovery {
                    since,
                    epoch,
                    request,
                    delta,
                },
            ),
            ClientCommand::Unsubscribe { room } => {
                let mut wanted = self.wanted();
                if wanted.remove(&room) {
                    self.hub.unsubscribe(&room, &self.subscriber);
                }
                drop(wanted);
                self.reply(ServerControl::Unsubscribed { room });
            }
            ClientCommand::Ping => self.reply(ServerControl::Pong),
            ClientCommand::Auth { token } => self.authenticate(&token),
        }
    }

    /// `auth`: a token for the connection, or a fresh one for the same subject.
    fn authenticate(&mut self, token: &str) {
        match self.admission.authenticate(token) {
            Ok(claims) if self.claims.as_ref().is_some_and(|held| held.sub != claims.sub) => self.reply_error(
                ErrorCode::BadToken,
                "a new token must keep the connection's subject (sub); reconnect to change it".into(),
                None,
            ),
            Ok(claims) => {
                let reply = ServerControl::Authed {
                    sub: claims.sub.clone(),
                    exp: claims.exp,
                };
                self.claims = Some(Box::new(claims));
                self.reply(reply);
            }
            Err(error) => self.reply_error(ErrorCode::BadToken, error.to_string(), None),
        }
    }

    /// Replies with an error that is not tied to a command (a binary frame, say).
    pub fn reject(&mut self, code: ErrorCode, message: &str, now_ms: u64) {
        if self.admit(now_ms) {
            self.reply_error(code, message.to_string(), None);
        }
    }

    /// Takes a client message's token from the command budget (`CommandBudget::take`): over the
    /// rate, a message is answered 104 or ignored without an answer; a flood sets `flooding`,
    /// and the driver closes the connection with 1008.
    fn admit(&mut self, now_ms: u64) -> bool {
        match self.budget.take(now_ms) {
            Admitted::Yes => true,
            Admitted::Refused => {
                self.reply_error(ErrorCode::RateLimited, "too many commands; slow down".into(), None);
                false
            }
            Admitted::Ignored => {
                self.hub.metrics().commands_ignored.inc();
                false
            }
            Admitted::Flooding => {
                self.flooding = true;
                false
            }
        }
    }

    /// The client floods commands (over a burst's worth over its rate, not made up for): its
    /// driver closes the connection with 1008.
    pub fn flooding(&self) -> bool {
        self.flooding
    }

    fn subscribe(&mut self, room: RoomName, recovery: Recovery) {
        if self.draining.load(Ordering::Relaxed) {
            return self.reply_error(
                ErrorCode::Draining,
                "the server is shutting down; reconnect".into(),
                Some(room),
            );
        }
        if self
            .admission
            .may_listen(room.as_str(), self.claims.as_deref())
            .is_err()
        {
            let message = match self.claims {
                Some(_) => "this room is private and the connection's token does not allow it",
                None => "this room needs a token: send auth first",
            };
            return self.reply_error(ErrorCode::Forbidden, message.into(), Some(room));
        }
        let mut wanted = self.wanted();
        if !wanted.contains(&room) && wanted.len() >= self.limits.max_subscriptions {
            drop(wanted);
            let message = format!("at most {} subscriptions per connection", self.limits.max_subscriptions);
            return self.reply_error(ErrorCode::TooManySubscriptions, message, Some(room));
        }
        wanted.insert(room.clone());
        drop(wanted);
        // The registry first makes sure the room's messages reach the hub (at once when
        // embedded; with Redis after subscribing its channel and loading its state and history).
        let (hub, rooms, subscriber) = (self.hub.clone(), self.rooms.clone(), self.subscriber.clone());
        let allowance = self.recovery.clone();
        let followed = room.clone();
        self.registry.follow(
            followed,
            Box::new(move |now_ms| {
                let joining = Joining {
                    hub: &hub,
                    rooms: &rooms,
                    subscriber: &subscriber,
                    allowance: &allowance,
                };
                joining.join(room, recovery, now_ms)
            }),
        );
    }

    fn reply(&self, control: ServerControl) {
        self.subscriber.push_control(self.hub.metrics(), control);
    }

    fn reply_error(&self, code: ErrorCode, message: String, room: Option<RoomName>) {
        self.hub.metrics().error(code);
        self.reply(ServerControl::Error { code, message, room });
    }
}

/// What a subscribe asked for besides the room: recovery after `since` in `epoch`, and the
/// request's `id` to echo in `subscribed`, and whether it takes states as deltas.
struct Recovery {
    since: Option<u64>,
    epoch: Option<String>,
    request: Option<u64>,
    delta: bool,
}

/// What a subscribe joins the room with, once the registry follows it.
struct Joining<'a> {
    hub: &'a Hub,
    rooms: &'a Mutex<HashSet<RoomName>>,
    subscriber: &'a Arc<Subscriber>,
    allowance: &'a Mutex<RecoveryBudget>,
}

impl Joining<'_> {
    /// Adds the subscriber to the room in the hub if the client still wants it; a recovery
    /// takes from the connection's allowance (beyond it, `recovered: false`).
    fn join(self, room: RoomName, recovery: Recovery, now_ms: u64) {
        let Joining {
            hub,
            rooms,
            subscriber,
            allowance,
        } = self;
        let mut wanted = rooms.lock().unwrap_or_else(|p| p.into_inner());
        if !wanted.contains(&room) {
            return;
        }
        let Recovery {
            since,
            epoch,
            request,
            delta,
        } = recovery;
        let mut allowance = allowance.lock().unwrap_or_else(|p| p.into_inner());
        let available = allowance.available(now_ms);
        match hub.subscribe(
            &room,
            subscriber,
            since,
            epoch.as_deref(),
            request,
            delta,
            available,
            now_ms,
        ) {
            Ok(recovered) => allowance.spend(recovered),
            Err(error @ HubError::RoomLimit(_)) => {
                wanted.remove(&room);
                drop(wanted);
                hub.metrics().error(ErrorCode::RoomLimit);
                let reply = ServerControl::Error {
                    code: ErrorCode::RoomLimit,
                    message: error.to_string(),
                    room: Some(room),
                };
                subscriber.push_control(hub.metrics(), reply);
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let rooms: Vec<RoomName> = self.wanted().drain().collect();
        for room in rooms {
            self.hub.unsubscribe(&room, &self.subscriber);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::CommandRate;
    use crate::core::{parse_command, Outgoing};
    use crate::hub::HubConfig;
    use crate::metrics::{Metrics, Transport};
    use crate::registry::EmbeddedRegistry;

    fn session_with_rate(limits: SessionLimits, rate: CommandRate) -> Session {
        let hub = Hub::new(HubConfig::default(), Arc::new(Metrics::new()), 1);
        let sub = hub.new_subscriber(Transport::WebSocket);
        let registry = Arc::new(EmbeddedRegistry::new(hub.clone()));
        Session::new(
            hub,
            registry,
            sub,
            limits,
            test_admission(rate),
            Arc::new(AtomicBool::new(false)),
            0,
        )
    }

    fn test_admission(commands: CommandRate) -> Admission {
        let settings = crate::admission::AdmissionSettings {
            max_connections: 10,
            allowed_origins: Vec::new(),
            publish_token: "p".into(),
            commands,
            recovery_bytes: usize::MAX,
            tokens: crate::tokens::TokenSettings {
                secret: Some("jwt".into()),
                ..Default::default()
            },
            private_rooms: crate::tokens::RoomPattern::list("user:*"),
            require_token: false,
            max_connections_per_ip: 10,
            connection_rate_per_ip: 0,
            publish_rate_per_ip: 0,
            trusted_proxies: Vec::new(),
        };
        Admission::new(settings, Arc::new(Metrics::new())).expect("admission")
    }

    fn token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"jwt"),
        )
        .expect("token")
    }

    #[test]
    fn a_private_room_needs_a_token_that_allows_it() {
        let mut s = session(SessionLimits::default());
        let exp = crate::clock::unix_ms() / 1000 + 60;
        s.handle(parse_command(r#"{"type":"subscribe","room":"user:55"}"#), 0);
        s.handle(
            parse_command(&json_auth(&token(serde_json::json!({"sub": "55", "exp": exp})))),
            0,
        );
        s.handle(parse_command(r#"{"type":"subscribe","room":"user:55"}"#), 0);
        s.handle(parse_command(r#"{"type":"subscribe","room":"user:56"}"#), 0);
        // A refresh keeps the subject; another subject is refused.
        s.handle(
            parse_command(&json_auth(&token(serde_json::json!({"sub": "56", "exp": exp})))),
            0,
        );
        s.handle(parse_command(r#"{"type":"auth","token":"forged"}"#), 0);
        let got = replies(&s);
        assert!(
            got[0].contains(r#""code":109"#) && got[0].contains("user:55"),
            "{}",
            got[0]
        );
        assert_eq!(got[1], format!(r#"{{"type":"authed","sub":"55","exp":{exp}}}"#));
        assert!(
            got[2].starts_with(r#"{"type":"subscribed","room":"user:55""#),
            "{}",
            got[2]
        );
        assert!(
            got[3].contains(r#""code":109"#) && got[3].contains("user:56"),
            "{}",
            got[3]
        );
        assert!(got[4].contains(r#""code":108"#), "{}", got[4]);
        assert!(got[5].contains(r#""code":108"#), "{}", got[5]);
        assert_eq!(s.token_expires_ms(), Some(exp * 1000));
    }

    fn json_auth(token: &str) -> String {
        serde_json::json!({"type": "auth", "token": token}).to_string()
    }

    fn session(limits: SessionLimits) -> Session {
        session_with_rate(limits, CommandRate::default())
    }

    fn replies(s: &Session) -> Vec<String> {
        let mut out = Vec::new();
        s.subscriber.drain_into(&mut out, usize::MAX);
        out.into_iter()
            .map(|o| match o {
                Outgoing::Control(c) => c.to_json().to_string(),
                Outgoing::Publication(p) => p.json_frame().to_string(),
                Outgoing::Delta(p) => p.json_frame_or_delta(true).to_string(),
            })
            .collect()
    }

    #[test]
    fn subscription_limit_is_enforced_and_resubscribing_does_not_count() {
        let mut s = session(SessionLimits { max_subscriptions: 2 });
        for room in ["a", "b", "a"] {
            s.handle(parse_command(&format!(r#"{{"type":"subscribe","room":"{room}"}}"#)), 0);
        }
        s.handle(parse_command(r#"{"type":"subscribe","room":"c"}"#), 0);
        let out = replies(&s);
        assert_eq!(out.len(), 4);
        assert!(
            out[3].contains(r#""code":103"#) && out[3].contains(r#""room":"c""#),
            "{}",
            out[3]
        );
        assert_eq!(s.subscription_count(), 2);
        s.handle(parse_command(r#"{"type":"unsubscribe","room":"a"}"#), 0);
        s.handle(parse_command(r#"{"type":"subscribe","room":"c"}"#), 0);
        let out = replies(&s);
        assert_eq!(out[0], r#"{"type":"unsubscribed","room":"a"}"#);
        assert!(out[1].starts_with(r#"{"type":"subscribed","room":"c""#));
    }

    #[test]
    fn bad_commands_get_errors_and_the_session_keeps_working() {
        let mut s = session(SessionLimits::default());
        s.handle(parse_command("{oops"), 0);
        s.handle(parse_command(r#"{"type":"dance"}"#), 0);
        s.handle(parse_command(r#"{"type":"subscribe","room":"no spaces"}"#), 0);
        s.handle(parse_command(r#"{"type":"ping"}"#), 0);
        let out = replies(&s);
        assert!(out[0].contains(r#""code":100"#));
        assert!(out[1].contains(r#""code":101"#));
        assert!(out[2].contains(r#""code":102"#));
        assert_eq!(out[3], r#"{"type":"pong"}"#);
    }

    #[test]
    fn commands_beyond_the_budget_are_refused_until_it_refills() {
        let mut s = session_with_rate(
            SessionLimits::default(),
            CommandRate {
                per_second: 10.0,
                burst: 2.0,
            },
        );
        for _ in 0..3 {
            s.handle(Ok(ClientCommand::Ping), 0);
        }
        s.handle(Ok(ClientCommand::Ping), 100);
        let out = replies(&s);
        assert_eq!(out[0], r#"{"type":"pong"}"#);
        assert_eq!(out[1], r#"{"type":"pong"}"#);
        assert!(out[2].contains(r#""code":104"#));
        assert_eq!(out[3], r#"{"type":"pong"}"#);
    }

    #[test]
    fn a_flood_over_the_rate_gets_one_104_and_is_named_after_a_burst_ignored() {
        let mut s = session_with_rate(
            SessionLimits::default(),
            CommandRate {
                per_second: 10.0,
                burst: 2.0,
            },
        );
        // Two taken, one refused, one ignored: the connection stays.
        for _ in 0..4 {
            s.handle(Ok(ClientCommand::Ping), 0);
        }
        // A malformed message over the rate counts the same, unanswered.
        s.reject(ErrorCode::UnsupportedFrame, "binary frames are not supported", 0);
        assert!(!s.flooding());
        assert_eq!(s.hub.metrics().commands_ignored.get(), 2);
        let out = replies(&s);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[2].contains(r#""code":104"#));
        s.handle(Ok(ClientCommand::Ping), 0);
        assert!(s.flooding());
        assert!(replies(&s).is_empty());
    }

    #[test]
    fn dropping_a_session_leaves_its_rooms() {
        let s = {
            let mut s = session(SessionLimits::default());
            s.handle(
                Ok(ClientCommand::Subscribe {
                    room: RoomName::parse("x").expect("room"),
                    since: None,
                    epoch: None,
                    request: None,
                    delta: false,
                }),
                0,
            );
            s
        };
        let hub = s.hub.clone();
        assert_eq!(hub.room_count(), 1);
        drop(s);
        assert_eq!(hub.room_count(), 0);
    }
}
