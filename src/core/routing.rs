//! Which WebTransport states go as datagrams and which on the reliable control stream. Pure, so
//! the rule is tested here: the state that follows a `subscribed` never depends on a datagram.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::protocol::ServerControl;
use super::room_name::RoomName;

/// When a session sends state updates as datagrams (`--wt-state-datagrams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateDatagrams {
    /// Every state that fits goes as a datagram, acknowledged and repaired.
    Always,
    /// States go over the control stream until the path loses a packet, then as datagrams, and
    /// back on the stream after `CLEAN_PERIOD` without loss: on a clean path a stream costs the
    /// server less per state (no ack datagram to receive, no QUIC ACK of it to send), and loss
    /// is when datagrams pay. The default: bench/README.md ("Which default") has the figures.
    #[default]
    AfterLoss,
}

impl StateDatagrams {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::AfterLoss => "after-loss",
        }
    }
}

/// The setting is neither `always` nor `after-loss`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected always or after-loss, got {0:?}")]
pub struct StateDatagramsError(String);

impl std::str::FromStr for StateDatagrams {
    type Err = StateDatagramsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "after-loss" => Ok(Self::AfterLoss),
            other => Err(StateDatagramsError(other.to_string())),
        }
    }
}

/// Where one state goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// As a datagram, to be acknowledged and repaired.
    Datagram,
    /// On the control stream, reliably.
    Stream,
}

/// With `AfterLoss`, a session whose path has lost nothing for this long goes back to the
/// stream: a loss early in a session does not cost it the datagram path's price for good.
pub const CLEAN_PERIOD: Duration = Duration::from_secs(30);

/// What `AfterLoss` knows of the path: QUIC's count of lost packets and when it last grew.
#[derive(Debug, Default, Clone, Copy)]
struct PathWatch {
    lost: u64,
    last_loss: Option<Instant>,
}

/// One session's routing of states.
#[derive(Debug, Default)]
pub struct StateRouting {
    /// States go as datagrams (when they fit): from the start with `Always`; with `AfterLoss`
    /// from a lost packet on, until the path has been clean for `CLEAN_PERIOD`.
    datagrams: bool,
    /// `None` with `Always`.
    path: Option<PathWatch>,
    /// Rooms whose next state goes on the stream: the state a client gets on subscribing
    /// must not depend on a datagram arriving.
    reliable_next: HashSet<RoomName>,
}

impl StateRouting {
    pub fn new(mode: StateDatagrams) -> Self {
        Self {
            datagrams: mode == StateDatagrams::Always,
            path: (mode == StateDatagrams::AfterLoss).then(PathWatch::default),
            reliable_next: HashSet::new(),
        }
    }

    /// Whether states may go as datagrams now.
    pub fn datagrams_on(&self) -> bool {
        self.datagrams
    }

    /// QUIC's count of packets lost on the session's path so far, read at `now`. With
    /// `AfterLoss`, states go as datagrams once it grows, and back on the stream after
    /// `CLEAN_PERIOD` without growth. Returns the new route when it changed.
    pub fn path_lost(&mut self, lost_packets: u64, now: Instant) -> Option<Route> {
        let path = self.path.as_mut()?;
        if lost_packets > path.lost {
            path.lost = lost_packets;
            path.last_loss = Some(now);
            if !std::mem::replace(&mut self.datagrams, true) {
                return Some(Route::Datagram);
            }
        } else if self.datagrams
            && path
                .last_loss
                .is_some_and(|at| now.saturating_duration_since(at) >= CLEAN_PERIOD)
        {
            self.datagrams = false;
            return Some(Route::Stream);
        }
        None
    }

    /// Notes a control reply on its way out. After a `subscribed` with a state (`version` > 0:
    /// the current state follows) or with `recovered` (every notice, and a reply to a subscribe
    /// with `since`), the room's next state goes reliably: it never overtakes the `subscribed`
    /// whose numbers it follows (after a notice a client would judge it by the room's previous
    /// numbers, drop it as stale and acknowledge the version it held, ending the repair). After
    /// `unsubscribed` nothing is owed.
    pub fn control(&mut self, control: &ServerControl) {
        match control {
            ServerControl::Subscribed {
                room,
                version,
                recovered,
                ..
            } if *version > 0 || recovered.is_some() => {
                self.reliable_next.insert(room.clone());
            }
            ServerControl::Unsubscribed { room } => {
                self.reliable_next.remove(room);
            }
            _ => {}
        }
    }

    /// Where the next state of `room` goes; `fits` says whether its datagram fits the path.
    pub fn route(&mut self, room: &RoomName, fits: bool) -> Route {
        let reliable = self.reliable_next.remove(room);
        if !reliable && fits && self.datagrams {
            Route::Datagram
        } else {
            Route::Stream
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RoomId;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).expect("room")
    }

    fn subscribed(name: &str, version: u64) -> ServerControl {
        ServerControl::Subscribed {
            room: room(name),
            room_id: RoomId(1),
            epoch: "e".into(),
            version,
            seq: 0,
            recovered: None,
            request: None,
        }
    }

    #[test]
    fn the_state_after_subscribed_goes_reliably_then_datagrams() {
        let mut routing = StateRouting::new(StateDatagrams::Always);
        routing.control(&subscribed("game:1", 3));
        assert_eq!(routing.route(&room("game:1"), true), Route::Stream);
        assert_eq!(routing.route(&room("game:1"), true), Route::Datagram);
        // A reply without a state owes nothing reliable.
        routing.control(&subscribed("game:2", 0));
        assert_eq!(routing.route(&room("game:2"), true), Route::Datagram);
        // A notice does, whatever its version (`recovered: false` carries 0): the newest state
        // follows it, and must not overtake it.
        for recovered in [false, true] {
            let mut notice = subscribed("game:3", 0);
            if let ServerControl::Subscribed { recovered: r, .. } = &mut notice {
                *r = Some(recovered);
            }
            routing.control(&notice);
            assert_eq!(routing.route(&room("game:3"), true), Route::Stream);
            assert_eq!(routing.route(&room("game:3"), true), Route::Datagram);
        }
    }

    #[test]
    fn states_that_do_not_fit_go_on_the_stream() {
        let mut routing = StateRouting::new(StateDatagrams::Always);
        assert_eq!(routing.route(&room("game:1"), false), Route::Stream);
    }

    #[test]
    fn unsubscribing_forgets_the_reliable_state_owed() {
        let mut routing = StateRouting::new(StateDatagrams::Always);
        routing.control(&subscribed("game:1", 3));
        routing.control(&ServerControl::Unsubscribed { room: room("game:1") });
        assert_eq!(routing.route(&room("game:1"), true), Route::Datagram);
    }

    #[test]
    fn after_loss_uses_the_stream_until_a_loss_and_again_after_a_clean_period() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut routing = StateRouting::new(StateDatagrams::AfterLoss);
        assert!(!routing.datagrams_on());
        assert_eq!(routing.path_lost(0, t0), None);
        assert_eq!(routing.route(&room("game:1"), true), Route::Stream);
        assert_eq!(routing.path_lost(1, t0 + s(1)), Some(Route::Datagram));
        assert_eq!(routing.path_lost(2, t0 + s(2)), None, "more loss is no change");
        assert_eq!(routing.route(&room("game:1"), true), Route::Datagram);
        // Clean since t0 + 2 s: still datagrams just before the clean period ends.
        assert_eq!(routing.path_lost(2, t0 + s(2) + CLEAN_PERIOD - s(1)), None);
        assert!(routing.datagrams_on());
        assert_eq!(routing.path_lost(2, t0 + s(2) + CLEAN_PERIOD), Some(Route::Stream));
        assert_eq!(routing.route(&room("game:1"), true), Route::Stream);
        // A new loss sends states back to datagrams.
        assert_eq!(routing.path_lost(3, t0 + s(60)), Some(Route::Datagram));
    }

    #[test]
    fn always_ignores_the_path() {
        let mut routing = StateRouting::new(StateDatagrams::Always);
        assert_eq!(routing.path_lost(5, Instant::now()), None);
        assert!(routing.datagrams_on());
        assert_eq!(routing.path_lost(5, Instant::now() + Duration::from_secs(3600)), None);
        assert!(routing.datagrams_on());
    }

    #[test]
    fn the_setting_parses_its_two_names() {
        for mode in [StateDatagrams::Always, StateDatagrams::AfterLoss] {
            assert_eq!(mode.as_str().parse(), Ok(mode));
        }
        assert!("sometimes".parse::<StateDatagrams>().is_err());
    }
}
