//! `courtside serve --demo`: drives the Saturday simulator (`simulator`, a pure model the bench
//! also loads) in real time or faster, and publishes what it produces through the registry,
//! exactly as HTTP publishes are.

pub mod bracket;
pub mod simulator;

use std::time::Duration;

use tracing::{info, warn};

use std::sync::Arc;

use crate::core::JsonData;
use crate::registry::Registry;
use crate::shutdown::ShutdownListener;
use simulator::{SaturdayConfig, SaturdayModel, SimPublish};

const TICK: Duration = Duration::from_millis(250);

/// Runs the simulator until shutdown. `speed` multiplies game time (1.0: real time).
pub async fn run(registry: Arc<dyn Registry>, speed: f64, seed: u64, mut stop: ShutdownListener) {
    let mut model = SaturdayModel::new(SaturdayConfig::default(), seed);
    let mut out = Vec::new();
    model.snapshot(&mut out);
    info!(
        leagues = model.config().leagues,
        teams = model.config().teams,
        games = model.game_rooms().len(),
        speed,
        "demo: simulating a Phoenix Saturday"
    );
    publish(registry.as_ref(), &mut out).await;
    let mut tick = tokio::time::interval(TICK);
    let step = (TICK.as_millis() as f64 * speed).max(1.0) as u64;
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {
                model.advance(step, &mut out);
                publish(registry.as_ref(), &mut out).await;
            }
        }
    }
}

async fn publish(registry: &dyn Registry, out: &mut Vec<SimPublish>) {
    for p in out.drain(..) {
        let Ok(data) = JsonData::parse(p.data.as_bytes()) else {
            continue;
        };
        if let Err(error) = registry.publish(&p.room, p.kind, &data).await {
            warn!(%error, room = %p.room, "demo publish refused");
        }
    }
}
