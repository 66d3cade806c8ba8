//! A model of a Saturday in the Phoenix market: 80 leagues, 3,500 teams, many basketball games at
//! once, each producing scores, period changes, finals, bracket advances and notifications. Pure
//! and seeded: `advance` takes elapsed game time and returns what to publish. Used by `--demo`
//! and by the bench suite.

use serde_json::json;

use super::bracket::{self, Bracket};
use crate::core::Kind;
use crate::core::RoomName;

/// Shape of the simulated Saturday.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaturdayConfig {
    pub leagues: u32,
    pub teams: u32,
    /// Games running at once in each league.
    pub courts_per_league: u32,
    /// Length of a quarter of game time (youth games: 4 × 8 minutes).
    pub quarter_ms: u64,
    /// Break between two games on a court.
    pub break_ms: u64,
}

impl Default for SaturdayConfig {
    fn default() -> Self {
        Self {
            leagues: 80,
            teams: 3500,
            courts_per_league: 5,
            quarter_ms: 8 * 60_000,
            break_ms: 5 * 60_000,
        }
    }
}

/// One message the model wants published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimPublish {
    pub room: RoomName,
    pub kind: Kind,
    /// JSON text.
    pub data: String,
}

/// A seeded xorshift generator: deterministic and dependency-free.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

#[derive(Debug, Clone)]
struct Game {
    id: u64,
    league: u32,
    court: u32,
    home: u32,
    away: u32,
    home_score: u32,
    away_score: u32,
    quarter: u32,
    /// Game time left in the quarter.
    left_ms: u64,
    /// Game time until this game tips off (during the break before it).
    starts_in_ms: u64,
    final_: bool,
    /// The bracket match this game plays (its winner advances).
    bracket_match: Option<usize>,
    /// Who led last (`true`: home), ties aside: a lead changes hands when the other team leads.
    last_leader: Option<bool>,
}

#[derive(Debug, Clone)]
struct League {
    id: u32,
    teams: Vec<u32>,
    /// Its finished games, newest first (`RESULTS_KEPT`), for its `results:{id}` room.
    results: Vec<serde_json::Value>,
    /// The league's playoffs, played on its first `BRACKET_COURTS` courts; a new one of the
    /// next sixteen teams starts when a champion is crowned.
    bracket: Bracket,
}

/// Courts of each league that play its bracket's matches (the others play league games between
/// teams outside the bracket).
const BRACKET_COURTS: u32 = 2;
/// Finished games a league's results room lists.
const RESULTS_KEPT: usize = 12;

/// The simulated Saturday.
#[derive(Debug, Clone)]
pub struct SaturdayModel {
    config: SaturdayConfig,
    rng: SimRng,
    leagues: Vec<League>,
    games: Vec<Game>,
    next_game_id: u64,
}

/// Average game time between scoring plays of one game: about 50 plays in 32 minutes.
const MEAN_MS_BETWEEN_SCORES: f64 = 38_000.0;

impl SaturdayModel {
    pub fn new(config: SaturdayConfig, seed: u64) -> Self {
        let mut rng = SimRng::new(seed);
        let leagues: Vec<League> = (0..config.leagues)
            .map(|l| {
                let teams: Vec<u32> = (0..config.teams).filter(|t| t % config.leagues == l).collect();
                let bracket = Bracket::new(l + 1, 1, teams.iter().take(bracket::SIZE).copied().collect());
                League {
                    id: l + 1,
                    teams,
                    results: Vec::new(),
                    bracket,
                }
            })
            .collect();
        let mut model = Self {
            config,
            rng: rng.clone(),
            leagues,
            games: Vec::new(),
            next_game_id: 1000,
        };
        for l in 0..model.leagues.len() {
            for court in 0..config.courts_per_league {
                // Stagger the courts so games are at different stages.
                let game = model.schedule(l, court, 0);
                model.games.push(game);
                let g = model.games.len() - 1;
                let elapsed = rng.below(4 * config.quarter_ms);
                model.games[g].quarter = (elapsed / config.quarter_ms) as u32 + 1;
                model.games[g].left_ms = config.quarter_ms - elapsed % config.quarter_ms;
                let played = elapsed as f64 / MEAN_MS_BETWEEN_SCORES;
                model.games[g].home_score = (played * 1.1) as u32;
                model.games[g].away_score = (played * 0.9) as u32;
                let (home, away) = (model.games[g].home_score, model.games[g].away_score);
                model.games[g].last_leader = (home != away).then_some(home > away);
            }
        }
        model.rng = rng;
        model
    }

    pub fn config(&self) -> &SaturdayConfig {
        &self.config
    }

    /// Rooms of every league, for clients that follow them.
    pub fn league_rooms(&self) -> Vec<String> {
        self.leagues.iter().map(|l| format!("league:{}", l.id)).collect()
    }

    /// Rooms of the games being played (or about to start).
    pub fn game_rooms(&self) -> Vec<String> {
        self.games.iter().map(|g| format!("game:{}", g.id)).collect()
    }

    /// A league's display name: an age group, a division and a city, distinct for each of the
    /// 80 leagues ("Mesa 12U Girls").
    pub fn league_name(id: u32) -> String {
        const AGES: [&str; 8] = ["10U", "11U", "12U", "13U", "14U", "15U", "16U", "17U"];
        const CITIES: [&str; 5] = ["Phoenix", "Mesa", "Chandler", "Scottsdale", "Glendale"];
        let k = id.saturating_sub(1) as usize;
        let division = if k % 2 == 0 { "Boys" } else { "Girls" };
        format!(
            "{} {} {division}",
            CITIES[(k / 2) % CITIES.len()],
            AGES[(k / 10) % AGES.len()]
        )
    }

    /// The `demo:leagues` state: every league's id and name, for a page's league picker.
    fn publish_leagues(&self, out: &mut Vec<SimPublish>) {
        let leagues: Vec<serde_json::Value> = self
            .leagues
            .iter()
            .map(|l| json!({"league": l.id, "name": Self::league_name(l.id)}))
            .collect();
        if let Ok(room) = RoomName::parse("demo:leagues") {
            out.push(SimPublish {
                room,
                kind: Kind::State,
                data: json!({ "leagues": leagues }).to_string(),
            });
        }
    }

    /// Bracket rooms, one per league.
    pub fn bracket_rooms(&self) -> Vec<String> {
        self.leagues.iter().map(|l| format!("bracket:{}", l.id)).collect()
    }

    /// The league a game room belongs to, for subscribing a fan to a game and its league.
    pub fn league_of_game(&self, game_room: &str) -> Option<String> {
        let id: u64 = game_room.strip_prefix("game:")?.parse().ok()?;
        self.games
            .iter()
            .find(|g| g.id == id)
            .map(|g| format!("league:{}", self.leagues[g.league as usize].id))
    }

    /// The next game of a court. A bracket court plays the bracket's next ready match (a new
    /// bracket of the league's next sixteen teams once the last one has its champion); another
    /// court, two teams outside the bracket that play nowhere else now (no team plays two games
    /// at once).
    fn schedule(&mut self, league: usize, court: u32, starts_in_ms: u64) -> Game {
        let id = self.next_game_id;
        self.next_game_id += 1;
        let mut bracket_match = None;
        let (home, away) = if court < BRACKET_COURTS {
            if self.leagues[league].bracket.champion().is_some() {
                // The next sixteen teams in turn that are not on a court now.
                let on_court: Vec<u32> = self
                    .games
                    .iter()
                    .filter(|g| g.league as usize == league)
                    .flat_map(|g| [g.home, g.away])
                    .collect();
                let l = &mut self.leagues[league];
                let edition = l.bracket.edition + 1;
                let start = (edition as usize - 1) * bracket::SIZE;
                let participants = (0..l.teams.len())
                    .map(|i| l.teams[(start + i) % l.teams.len()])
                    .filter(|t| !on_court.contains(t))
                    .take(bracket::SIZE)
                    .collect();
                l.bracket = Bracket::new(l.id, edition, participants);
            }
            let l = &mut self.leagues[league];
            match l.bracket.next_ready() {
                Some(m) => {
                    l.bracket.schedule(m, id);
                    if starts_in_ms == 0 {
                        l.bracket.start(m);
                    }
                    bracket_match = Some(m);
                    let [one, two] = l.bracket.matches[m].opponents;
                    (one.unwrap_or_default(), two.unwrap_or_default())
                }
                // Both matches left in this round are being played on the other court: this one
                // plays a league game meanwhile.
                None => self.free_pair(league),
            }
        } else {
            self.free_pair(league)
        };
        Game {
            id,
            league: league as u32,
            court,
            home,
            away,
            home_score: 0,
            away_score: 0,
            quarter: 1,
            left_ms: self.config.quarter_ms,
            starts_in_ms,
            final_: false,
            bracket_match,
            last_leader: None,
        }
    }

    /// Two teams of the league, neither in its bracket nor on a court now.
    fn free_pair(&mut self, league: usize) -> (u32, u32) {
        let l = &self.leagues[league];
        let busy = |t: &u32| {
            l.bracket.participants.contains(t)
                || self
                    .games
                    .iter()
                    .any(|g| g.league as usize == league && (g.home == *t || g.away == *t))
        };
        let free: Vec<u32> = l.teams.iter().copied().filter(|t| !busy(t)).collect();
        let n = free.len() as u64;
        if n < 2 {
            // Not with the default Saturday (43 or 44 teams a league, 16 in the bracket, at most
            // 10 on courts); a tiny configuration plays whoever is first.
            return (l.teams[0], l.teams[1 % l.teams.len()]);
        }
        let home = self.rng.below(n);
        let away = (home + 1 + self.rng.below(n - 1)) % n;
        (free[home as usize], free[away as usize])
    }

    /// The current state of every game, league and bracket, for a fresh node to publish first.
    pub fn snapshot(&self, out: &mut Vec<SimPublish>) {
        let mut by_league: Vec<Vec<serde_json::Value>> = vec![Vec::new(); self.leagues.len()];
        for (g, game) in self.games.iter().enumerate() {
            self.publish_game(g, out);
            by_league[game.league as usize].push(self.game_json(game));
        }
        self.publish_leagues(out);
        for (league, games) in by_league.into_iter().enumerate() {
            self.publish_league(league, games, out);
            self.publish_bracket(league, out);
            self.publish_results(league, out);
        }
    }

    /// Advances game time by `dt_ms` and appends what must be published to `out`.
    pub fn advance(&mut self, dt_ms: u64, out: &mut Vec<SimPublish>) {
        let mut touched_leagues = Vec::new();
        for g in 0..self.games.len() {
            let mut changed = false;
            let mut dt = dt_ms;
            if self.games[g].starts_in_ms > 0 {
                let wait = self.games[g].starts_in_ms.min(dt);
                self.games[g].starts_in_ms -= wait;
                dt -= wait;
                if self.games[g].starts_in_ms == 0 {
                    changed = true;
                    self.notify(g, "tipoff", out);
                    if let Some(m) = self.games[g].bracket_match {
                        let league = self.games[g].league as usize;
                        self.leagues[league].bracket.start(m);
                        self.publish_bracket(league, out);
                    }
                }
            }
            if dt == 0 || self.games[g].final_ {
                if changed {
                    self.publish_game(g, out);
                    touched_leagues.push(self.games[g].league);
                }
                continue;
            }
            // Scoring plays arrive as a Poisson process.
            let p = 1.0 - (-(dt as f64) / MEAN_MS_BETWEEN_SCORES).exp();
            if self.rng.unit() < p {
                let points = match self.rng.below(10) {
                    0..=5 => 2,
                    6..=7 => 3,
                    _ => 1,
                };
                if self.rng.unit() < 0.5 {
                    self.games[g].home_score += points;
                } else {
                    self.games[g].away_score += points;
                }
                changed = true;
                // The lead changes hands (through a tie or not; not the first basket): worth a
                // notification.
                let game = &mut self.games[g];
                let leader = match game.home_score.cmp(&game.away_score) {
                    std::cmp::Ordering::Greater => Some(true),
                    std::cmp::Ordering::Less => Some(false),
                    std::cmp::Ordering::Equal => None,
                };
                if let Some(now) = leader {
                    let changed_hands = game.last_leader.is_some_and(|before| before != now);
                    game.last_leader = Some(now);
                    if changed_hands {
                        self.notify(g, "lead", out);
                    }
                }
            }
            let game = &mut self.games[g];
            if dt >= game.left_ms {
                changed = true;
                if game.quarter < 4 || game.home_score == game.away_score {
                    game.quarter += 1;
                    game.left_ms = if game.quarter > 4 {
                        self.config.quarter_ms / 2
                    } else {
                        self.config.quarter_ms
                    };
                } else {
                    game.left_ms = 0;
                    game.final_ = true;
                }
            } else {
                game.left_ms -= dt;
            }
            if changed {
                self.publish_game(g, out);
                touched_leagues.push(self.games[g].league);
            }
            if self.games[g].final_ {
                self.finish(g, out);
            }
        }
        touched_leagues.sort_unstable();
        touched_leagues.dedup();
        if touched_leagues.is_empty() {
            return;
        }
        let mut by_league: Vec<Vec<serde_json::Value>> = vec![Vec::new(); self.leagues.len()];
        for game in &self.games {
            if touched_leagues.binary_search(&game.league).is_ok() {
                by_league[game.league as usize].push(self.game_json(game));
            }
        }
        for league in touched_leagues {
            self.publish_league(league as usize, std::mem::take(&mut by_league[league as usize]), out);
        }
    }

    /// A team's display name: distinct within its league (teams `l + 80k` are named by `k`).
    fn team_name(team: u32) -> String {
        const MASCOTS: [&str; 12] = [
            "Suns",
            "Coyotes",
            "Roadrunners",
            "Scorpions",
            "Diamondbacks",
            "Hawks",
            "Rattlers",
            "Javelinas",
            "Falcons",
            "Storm",
            "Heat",
            "Mustangs",
        ];
        const PLACES: [&str; 10] = [
            "Mesa",
            "Tempe",
            "Chandler",
            "Gilbert",
            "Glendale",
            "Scottsdale",
            "Peoria",
            "Surprise",
            "Goodyear",
            "Phoenix",
        ];
        let (league, k) = ((team % 80) as usize, (team / 80) as usize);
        format!(
            "{} {}",
            PLACES[k % PLACES.len()],
            MASCOTS[(k / PLACES.len() + league) % MASCOTS.len()]
        )
    }

    fn game_json(&self, g: &Game) -> serde_json::Value {
        let status = if g.final_ {
            "final"
        } else if g.starts_in_ms > 0 {
            "scheduled"
        } else {
            "live"
        };
        let secs = g.left_ms / 1000;
        let mut game = json!({
            "game": g.id,
            "league": self.leagues[g.league as usize].id,
            "court": g.court + 1,
            "status": status,
            "period": g.quarter,
            "clock": format!("{}:{:02}", secs / 60, secs % 60),
            "home": {"team": g.home, "name": Self::team_name(g.home), "score": g.home_score},
            "away": {"team": g.away, "name": Self::team_name(g.away), "score": g.away_score},
        });
        if g.starts_in_ms > 0 {
            // Game time until tip-off, for a schedule.
            game["starts_in_s"] = json!(g.starts_in_ms.div_ceil(1000));
        }
        game
    }

    fn publish_game(&self, g: usize, out: &mut Vec<SimPublish>) {
        let game = &self.games[g];
        if let Ok(room) = RoomName::parse(&format!("game:{}", game.id)) {
            out.push(SimPublish {
                room,
                kind: Kind::State,
                data: self.game_json(game).to_string(),
            });
        }
    }

    fn publish_league(&self, league: usize, games: Vec<serde_json::Value>, out: &mut Vec<SimPublish>) {
        let l = &self.leagues[league];
        let data = json!({"league": l.id, "name": Self::league_name(l.id), "games": games});
        if let Ok(room) = RoomName::parse(&format!("league:{}", l.id)) {
            out.push(SimPublish {
                room,
                kind: Kind::State,
                data: data.to_string(),
            });
        }
    }

    fn notify(&self, g: usize, what: &str, out: &mut Vec<SimPublish>) {
        let game = &self.games[g];
        let league = self.leagues[game.league as usize].id;
        let (home, away) = (Self::team_name(game.home), Self::team_name(game.away));
        let text = match what {
            "tipoff" => format!("Tip-off on court {}: {home} vs {away}", game.court + 1),
            "lead" => {
                let secs = game.left_ms / 1000;
                let period = if game.quarter > 4 {
                    format!("OT{}", game.quarter - 4)
                } else {
                    format!("Q{}", game.quarter)
                };
                let (leader, trailer, high, low) = if game.home_score > game.away_score {
                    (&home, &away, game.home_score, game.away_score)
                } else {
                    (&away, &home, game.away_score, game.home_score)
                };
                format!(
                    "{period} {}:{:02}: {leader} take the lead {high}–{low} over {trailer}",
                    secs / 60,
                    secs % 60
                )
            }
            _ => format!(
                "Final: {} {} – {} {}",
                Self::team_name(game.home),
                game.home_score,
                Self::team_name(game.away),
                game.away_score
            ),
        };
        let data = json!({"kind": what, "game": game.id, "teams": [game.home, game.away], "text": text}).to_string();
        for room in [
            format!("league:{league}"),
            format!("team:{}", game.home),
            format!("team:{}", game.away),
        ] {
            if let Ok(room) = RoomName::parse(&room) {
                out.push(SimPublish {
                    room,
                    kind: Kind::Event,
                    data: data.clone(),
                });
            }
        }
    }

    fn publish_bracket(&self, league: usize, out: &mut Vec<SimPublish>) {
        let l = &self.leagues[league];
        if let Ok(room) = RoomName::parse(&format!("bracket:{}", l.id)) {
            out.push(SimPublish {
                room,
                kind: Kind::State,
                data: l.bracket.to_json(&Self::league_name(l.id), Self::team_name).to_string(),
            });
        }
    }

    /// The `results:{league}` state: the league's finished games, newest first.
    fn publish_results(&self, league: usize, out: &mut Vec<SimPublish>) {
        let l = &self.leagues[league];
        if let Ok(room) = RoomName::parse(&format!("results:{}", l.id)) {
            out.push(SimPublish {
                room,
                kind: Kind::State,
                data: json!({"league": l.id, "results": l.results}).to_string(),
            });
        }
    }

    fn finish(&mut self, g: usize, out: &mut Vec<SimPublish>) {
        self.notify(g, "final", out);
        let game = self.games[g].clone();
        let league = game.league as usize;
        let result = self.game_json(&game);
        let results = &mut self.leagues[league].results;
        results.insert(0, result);
        results.truncate(RESULTS_KEPT);
        self.publish_results(league, out);
        if let Some(m) = game.bracket_match {
            let l = &mut self.leagues[league];
            let round = l.bracket.matches[m].round;
            if let Some((winner, loser)) = l.bracket.finish(m, [game.home_score, game.away_score]) {
                let (high, low) = (
                    game.home_score.max(game.away_score),
                    game.home_score.min(game.away_score),
                );
                let text = match l.bracket.champion() {
                    Some(champion) => format!(
                        "{} beat {} {high}–{low} and win the {} playoffs",
                        Self::team_name(champion),
                        Self::team_name(loser),
                        Self::league_name(l.id)
                    ),
                    None => format!(
                        "{} beat {} {high}–{low}: on to the {}",
                        Self::team_name(winner),
                        Self::team_name(loser),
                        Bracket::round_name(round + 1).to_lowercase()
                    ),
                };
                let event = json!({
                    "kind": "advance",
                    "team": winner,
                    "name": Self::team_name(winner),
                    "eliminated": loser,
                    "round": Bracket::round_name(round),
                    "text": text,
                })
                .to_string();
                if let Ok(room) = RoomName::parse(&format!("bracket:{}", l.id)) {
                    out.push(SimPublish {
                        room,
                        kind: Kind::Event,
                        data: event,
                    });
                }
                self.publish_bracket(league, out);
            }
        }
        // The finished game leaves the court first: its teams are free for the next pairing.
        self.games[g].home = u32::MAX;
        self.games[g].away = u32::MAX;
        let next = self.schedule(league, game.court, self.config.break_ms);
        self.games[g] = next;
        if next_is_new_bracket(&self.leagues[league].bracket) {
            self.publish_bracket(league, out);
        }
    }
}

/// Whether a bracket was just created (nothing scheduled in it but its first match).
fn next_is_new_bracket(b: &Bracket) -> bool {
    b.edition > 1 && b.matches.iter().filter(|m| m.game.is_some()).count() == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_saturday_has_the_documented_shape() {
        let model = SaturdayModel::new(SaturdayConfig::default(), 1);
        assert_eq!(model.league_rooms().len(), 80);
        assert_eq!(model.game_rooms().len(), 400);
        let teams: usize = model.leagues.iter().map(|l| l.teams.len()).sum();
        assert_eq!(teams, 3500);
        assert_eq!(
            model.league_of_game(&model.game_rooms()[0]).as_deref(),
            Some("league:1")
        );
        let mut names: Vec<String> = (1..=80).map(SaturdayModel::league_name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 80, "every league has its own name");
    }

    #[test]
    fn a_quarter_hour_produces_plausible_scores_finals_and_brackets() {
        let mut model = SaturdayModel::new(SaturdayConfig::default(), 7);
        let mut out = Vec::new();
        for _ in 0..900 {
            model.advance(1000, &mut out);
        }
        let count = |prefix: &str, kind: Kind| {
            out.iter()
                .filter(|p| p.room.as_str().starts_with(prefix) && p.kind == kind)
                .count()
        };
        let game_states = count("game:", Kind::State);
        // 400 games, a scoring play every ~38 s each: roughly 9,500 in 15 minutes, plus periods.
        assert!((6_000..20_000).contains(&game_states), "{game_states}");
        assert!(count("league:", Kind::Event) > 100, "finals and tip-offs are announced");
        assert!(count("bracket:", Kind::Event) > 10, "bracket games advance winners");
        let kinds = |kind: &str| {
            out.iter()
                .filter(|p| p.room.as_str().starts_with("league:") && p.data.contains(&format!("\"kind\":\"{kind}\"")))
                .count()
        };
        // Tip-offs, lead changes and finals, all of them: a fan of a league reads a few a minute.
        assert!(
            kinds("tipoff") > 50 && kinds("final") > 50,
            "{} {}",
            kinds("tipoff"),
            kinds("final")
        );
        assert!(kinds("lead") > 200, "lead changes: {}", kinds("lead"));
        assert!(count("results:", Kind::State) > 50, "finished games are listed");
        for p in out.iter().step_by(97) {
            assert!(serde_json::from_str::<serde_json::Value>(&p.data).is_ok());
        }
        // A league scoreboard fits a datagram.
        let biggest_league = out
            .iter()
            .filter(|p| p.room.as_str().starts_with("league:") && p.kind == Kind::State)
            .map(|p| p.data.len())
            .max();
        assert!(biggest_league.is_some_and(|n| n < 1100), "{biggest_league:?}");
    }

    #[test]
    fn teams_of_a_league_have_distinct_names_and_never_play_themselves() {
        let model = SaturdayModel::new(SaturdayConfig::default(), 1);
        for league in &model.leagues {
            let mut names: Vec<String> = league.teams.iter().map(|t| SaturdayModel::team_name(*t)).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), league.teams.len());
        }
        assert!(model.games.iter().all(|g| g.home != g.away));
    }

    /// Hours of play: no team is ever on two courts at once, bracket courts play their bracket's
    /// matches between its own teams, league games never take a bracket team, every result moves
    /// the bracket on, and a champion is followed by a new bracket.
    #[test]
    fn teams_play_one_game_at_a_time_and_brackets_fill_with_their_own_teams() {
        let mut model = SaturdayModel::new(SaturdayConfig::default(), 5);
        let mut out = Vec::new();
        let mut advances = 0;
        // Six hours in steps of a minute of game time.
        for _ in 0..360 {
            model.advance(60_000, &mut out);
            let mut on_court = std::collections::HashSet::new();
            for game in model.games.iter().filter(|g| !g.final_) {
                for team in [game.home, game.away] {
                    assert!(on_court.insert(team), "team {team} on two courts");
                }
            }
            for game in &model.games {
                let bracket = &model.leagues[game.league as usize].bracket;
                let in_bracket = |t: u32| bracket.participants.contains(&t);
                match game.bracket_match {
                    Some(m) => {
                        let [one, two] = bracket.matches[m].opponents;
                        assert_eq!((Some(game.home), Some(game.away)), (one, two));
                    }
                    None => assert!(!in_bracket(game.home) && !in_bracket(game.away)),
                }
            }
            advances += out
                .iter()
                .filter(|p| p.kind == Kind::Event && p.room.as_str().starts_with("bracket:"))
                .count();
            out.clear();
        }
        // Two bracket courts a league, a game and a break every 37 minutes or so: about 19 results
        // a league in six hours, more than one bracket's 15.
        assert!(advances > 80 * 15, "{advances} bracket results");
        assert!(
            model.leagues.iter().all(|l| l.bracket.edition >= 2),
            "champions were crowned"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_saturday() {
        let run = |seed| {
            let mut model = SaturdayModel::new(SaturdayConfig::default(), seed);
            let mut out = Vec::new();
            for _ in 0..60 {
                model.advance(1000, &mut out);
            }
            out
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
