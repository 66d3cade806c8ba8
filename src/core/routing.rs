//! Which WebTransport states go as datagrams and which on the reliable control stream. Pure, so
//! the rule is tested here: the first state after `subscribed` never depends on a datagram.

use std::collections::HashSet;

use super::protocol::ServerControl;
use super::room_name::RoomName;

/// When a session sends state updates as datagrams (`--wt-state-datagrams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateDatagrams {
    /// Every state that fits goes as a datagram, acknowledged and repaired.
    Always,
    /// States go over the control stream until the path loses a packet, then as datagrams: on
    /// a clean path a stream costs the server less per state (no ack datagram to receive, no
    /// QUIC ACK of it to send), and loss is when datagrams pay. The default: bench/README.md
    /// ("Which default") has the figures on a clean and a lossy path.
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

/// One session's routing of states.
#[derive(Debug, Default)]
pub struct StateRouting {
    /// States go as datagrams (when they fit): from the start with `Always`, from the first
    /// lost packet with `AfterLoss`.
    datagrams: bool,
    /// Rooms whose next state goes on the stream: the state a client gets on subscribing
    /// must not depend on a datagram arriving.
    reliable_next: HashSet<RoomName>,
}

impl StateRouting {
    pub fn new(mode: StateDatagrams) -> Self {
        Self {
            datagrams: mode == StateDatagrams::Always,
            reliable_next: HashSet::new(),
        }
    }

    /// Whether states may go as datagrams now.
    pub fn datagrams_on(&self) -> bool {
        self.datagrams
    }

    /// The path lost a packet: states go as datagrams from now on. Returns whether that is a change.
    pub fn loss_seen(&mut self) -> bool {
        !std::mem::replace(&mut self.datagrams, true)
    }

    /// Notes a control reply on its way out: after `subscribed` with a state, that state (next
    /// in the queue) goes reliably; after `unsubscribed` nothing is owed for the room.
    pub fn control(&mut self, control: &ServerControl) {
        match control {
            ServerControl::Subscribed { room, version, .. } if *version > 0 => {
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
        }
    }

    #[test]
    fn the_state_after_subscribed_goes_reliably_then_datagrams() {
        let mut routing = StateRouting::new(StateDatagrams::Always);
        routing.control(&subscribed("game:1", 3));
        assert_eq!(routing.route(&room("game:1"), true), Route::Stream);
        assert_eq!(routing.route(&room("game:1"), true), Route::Datagram);
        // A room without a state yet owes nothing reliable.
        routing.control(&subscribed("game:2", 0));
        assert_eq!(routing.route(&room("game:2"), true), Route::Datagram);
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
    fn after_loss_uses_the_stream_until_the_first_loss() {
        let mut routing = StateRouting::new(StateDatagrams::AfterLoss);
        assert!(!routing.datagrams_on());
        assert_eq!(routing.route(&room("game:1"), true), Route::Stream);
        assert!(routing.loss_seen());
        assert!(!routing.loss_seen(), "only the first loss is a change");
        assert_eq!(routing.route(&room("game:1"), true), Route::Datagram);
    }

    #[test]
    fn the_setting_parses_its_two_names() {
        for mode in [StateDatagrams::Always, StateDatagrams::AfterLoss] {
            assert_eq!(mode.as_str().parse(), Ok(mode));
        }
        assert!("sometimes".parse::<StateDatagrams>().is_err());
    }
}
