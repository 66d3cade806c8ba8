//! `courtside serve --demo`: drives the Saturday simulator in real time (or faster) and publishes
//! what it produces through the registry, exactly as HTTP publishes are.

use std::time::Duration;

use tracing::{info, warn};

use crate::core::JsonData;
use crate::hub::Hub;
use crate::registry::Registry;
use crate::shutdown::ShutdownListener;
use crate::simulator::{SaturdayConfig, SaturdayModel, SimPublish};

const TICK: Duration = Duration::from_millis(250);

/// Runs the simulator until shutdown. `speed` multiplies game time (1.0: real time).
pub async fn run(hub: Hub, registry: Registry, speed: f64, seed: u64, mut stop: ShutdownListener) {
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
    publish(&hub, &registry, &mut out).await;
    let mut tick = tokio::time::interval(TICK);
    let step = (TICK.as_millis() as f64 * speed).max(1.0) as u64;
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {
                model.advance(step, &mut out);
                publish(&hub, &registry, &mut out).await;
            }
        }
    }
}

async fn publish(hub: &Hub, registry: &Registry, out: &mut Vec<SimPublish>) {
    for p in out.drain(..) {
        let Ok(data) = JsonData::parse(p.data.as_bytes()) else {
            continue;
        };
        if let Err(error) = registry.publish(hub, &p.room, p.kind, &data).await {
            warn!(%error, room = %p.room, "demo publish refused");
        }
    }
}
