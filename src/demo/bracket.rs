//! A league's playoff bracket: sixteen teams, single elimination, in the shape of brackets-model
//! (participants, stage, rounds, matches with `opponent1`/`opponent2` `{id, position, score,
//! result}` and a status), the shape README recommends for bracket rooms. Pure: the simulator
//! plays its matches on a league's first courts and reports each result here.

use serde_json::{json, Value};

/// Teams in a bracket.
pub const SIZE: usize = 16;
/// Rounds of a sixteen-team single elimination.
pub const ROUNDS: usize = 4;
const ROUND_NAMES: [&str; ROUNDS] = ["Round of 16", "Quarterfinals", "Semifinals", "Final"];
/// Seeds of the first round's matches, in match order (1 v 16, 8 v 9, ...): the top seeds meet
/// only in the final.
const FIRST_ROUND: [(usize, usize); SIZE / 2] = [(1, 16), (8, 9), (5, 12), (4, 13), (6, 11), (3, 14), (7, 10), (2, 15)];

/// brackets-model's match status (`Status` there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Neither opponent is known yet.
    Locked = 0,
    /// One opponent is known.
    Waiting = 1,
    /// Both are known; not started.
    Ready = 2,
    Running = 3,
    Completed = 4,
}

/// One match of the bracket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// 0 for the first round.
    pub round: usize,
    /// 1-based within its round.
    pub number: usize,
    pub opponents: [Option<u32>; 2],
    pub scores: [u32; 2],
    pub status: Status,
    /// The game that plays it, once scheduled.
    pub game: Option<u64>,
}

/// The bracket of one league's playoffs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bracket {
    pub league: u32,
    /// How many brackets the league has started today (1 for the first).
    pub edition: u32,
    /// The teams, by seed (seed 1 first).
    pub participants: Vec<u32>,
    /// Every match, round by round (8, 4, 2, 1).
    pub matches: Vec<Match>,
}

/// Index of the first match of `round`.
fn round_start(round: usize) -> usize {
    (0..round).map(|r| SIZE >> (r + 1)).sum()
}

impl Bracket {
    /// A new bracket of `participants` (by seed; exactly `SIZE`, or the first round has byes
    /// filled by nobody and never becomes ready).
    pub fn new(league: u32, edition: u32, participants: Vec<u32>) -> Self {
        let mut matches = Vec::with_capacity(SIZE - 1);
        for (k, (a, b)) in FIRST_ROUND.iter().enumerate() {
            let opponents = [participants.get(a - 1).copied(), participants.get(b - 1).copied()];
            matches.push(Match {
                round: 0,
                number: k + 1,
                opponents,
                scores: [0, 0],
                status: Self::waiting_status(opponents),
                game: None,
            });
        }
        for round in 1..ROUNDS {
            for k in 0..(SIZE >> (round + 1)) {
                matches.push(Match {
                    round,
                    number: k + 1,
                    opponents: [None, None],
                    scores: [0, 0],
                    status: Status::Locked,
                    game: None,
                });
            }
        }
        Self {
            league,
            edition,
            participants,
            matches,
        }
    }

    fn waiting_status(opponents: [Option<u32>; 2]) -> Status {
        match opponents.iter().flatten().count() {
            0 => Status::Locked,
            1 => Status::Waiting,
            _ => Status::Ready,
        }
    }

    /// The first match, in match order, that is ready and has no game yet.
    pub fn next_ready(&self) -> Option<usize> {
        self.matches
            .iter()
            .position(|m| m.status == Status::Ready && m.game.is_none())
    }

    /// A game was scheduled to play match `m`.
    pub fn schedule(&mut self, m: usize, game: u64) {
        if let Some(matched) = self.matches.get_mut(m) {
            matched.game = Some(game);
        }
    }

    /// Match `m` tipped off.
    pub fn start(&mut self, m: usize) {
        if let Some(matched) = self.matches.get_mut(m) {
            if matched.status == Status::Ready {
                matched.status = Status::Running;
            }
        }
    }

    /// Match `m` ended with `scores` (opponent 1's, opponent 2's; never a tie): its winner takes
    /// its place in the next round. Returns (winner, loser).
    pub fn finish(&mut self, m: usize, scores: [u32; 2]) -> Option<(u32, u32)> {
        let matched = self.matches.get_mut(m)?;
        let [Some(one), Some(two)] = matched.opponents else {
            return None;
        };
        matched.scores = scores;
        matched.status = Status::Completed;
        let (winner, loser) = if scores[0] > scores[1] { (one, two) } else { (two, one) };
        let (round, k) = (matched.round, matched.number - 1);
        if round + 1 < ROUNDS {
            let next = round_start(round + 1) + k / 2;
            let slot = k % 2;
            let following = &mut self.matches[next];
            following.opponents[slot] = Some(winner);
            following.status = Self::waiting_status(following.opponents);
        }
        Some((winner, loser))
    }

    /// The champion, once the final is played.
    pub fn champion(&self) -> Option<u32> {
        let last = self.matches.last()?;
        if last.status != Status::Completed {
            return None;
        }
        let [Some(one), Some(two)] = last.opponents else {
            return None;
        };
        Some(if last.scores[0] > last.scores[1] { one } else { two })
    }

    /// The round's name ("Quarterfinals"...).
    pub fn round_name(round: usize) -> &'static str {
        ROUND_NAMES.get(round).copied().unwrap_or("Round")
    }

    /// The bracket as its room's state: brackets-model's shape (stage, group, rounds, matches,
    /// participants) with the league and the edition, the stage named after `league_name`, team
    /// names from `name`.
    pub fn to_json(&self, league_name: &str, name: impl Fn(u32) -> String) -> Value {
        let stage = self.edition;
        let opponent = |m: &Match, slot: usize| -> Value {
            let Some(team) = m.opponents[slot] else {
                return json!({"id": null});
            };
            let mut value = json!({"id": team});
            if m.round == 0 {
                let seed = FIRST_ROUND[m.number - 1];
                value["position"] = json!(if slot == 0 { seed.0 } else { seed.1 });
            }
            // The live score is the game room's: the bracket changes when a match starts and
            // when it ends, not on every basket.
            if m.status == Status::Completed {
                value["score"] = json!(m.scores[slot]);
                let won = m.scores[slot] > m.scores[1 - slot];
                value["result"] = json!(if won { "win" } else { "loss" });
            }
            value
        };
        let matches: Vec<Value> = self
            .matches
            .iter()
            .enumerate()
            .map(|(id, m)| {
                json!({
                    "id": id,
                    "stage_id": stage,
                    "group_id": 0,
                    "round_id": m.round,
                    "number": m.number,
                    "child_count": 0,
                    "status": m.status as u8,
                    "game": m.game,
                    "opponent1": opponent(m, 0),
                    "opponent2": opponent(m, 1),
                })
            })
            .collect();
        let rounds: Vec<Value> = (0..ROUNDS)
            .map(|r| {
                json!({
                    "id": r,
                    "stage_id": stage,
                    "group_id": 0,
                    "number": r + 1,
                    "name": Self::round_name(r),
                })
            })
            .collect();
        let participants: Vec<Value> = self
            .participants
            .iter()
            .map(|t| json!({"id": t, "tournament_id": self.league, "name": name(*t)}))
            .collect();
        json!({
            "league": self.league,
            "edition": self.edition,
            "stage": {
                "id": stage,
                "tournament_id": self.league,
                "name": format!("{league_name} playoffs #{}", self.edition),
                "type": "single_elimination",
                "number": self.edition,
                "settings": {"size": SIZE},
            },
            "group": {"id": 0, "stage_id": stage, "number": 1},
            "rounds": rounds,
            "matches": matches,
            "participants": participants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bracket() -> Bracket {
        Bracket::new(3, 1, (100..116).collect())
    }

    /// Seeds 1 and 2 meet only in the final; each winner takes its slot in the next round, and
    /// the final's winner is the champion.
    #[test]
    fn winners_move_up_to_the_final() {
        let mut b = bracket();
        assert_eq!(b.matches.len(), 15);
        assert_eq!(b.matches[0].opponents, [Some(100), Some(115)], "1 v 16");
        assert_eq!(b.matches[7].opponents, [Some(101), Some(114)], "2 v 15");
        assert!(b.matches[..8].iter().all(|m| m.status == Status::Ready));
        assert!(b.matches[8..].iter().all(|m| m.status == Status::Locked));
        let mut played = 0;
        while let Some(m) = b.next_ready() {
            b.schedule(m, 1000 + m as u64);
            b.start(m);
            // The better seed (earlier in `participants`) wins.
            let [Some(one), Some(two)] = b.matches[m].opponents else {
                panic!("a ready match has two opponents")
            };
            let scores = if one < two { [50, 40] } else { [40, 50] };
            let (winner, _) = b.finish(m, scores).expect("a result");
            assert_eq!(winner, one.min(two));
            played += 1;
            if m == 0 {
                assert_eq!(b.matches[8].opponents, [Some(100), None]);
                assert_eq!(b.matches[8].status, Status::Waiting);
            }
        }
        assert_eq!(played, 15);
        assert_eq!(
            b.matches[14].opponents,
            [Some(100), Some(101)],
            "seeds 1 and 2 in the final"
        );
        assert_eq!(b.champion(), Some(100));
    }

    /// The room's state: brackets-model's fields, positions in the first round only, scores and
    /// results once a match is completed (the live score is the game room's).
    #[test]
    fn the_state_has_the_brackets_model_shape() {
        let mut b = bracket();
        b.schedule(0, 7);
        b.start(0);
        b.finish(0, [61, 55]);
        let state = b.to_json("Mesa 10U Boys", |t| format!("team {t}"));
        assert_eq!(state["stage"]["name"], "Mesa 10U Boys playoffs #1");
        assert_eq!(state["stage"]["type"], "single_elimination");
        assert_eq!(state["participants"].as_array().map(Vec::len), Some(16));
        assert_eq!(state["rounds"][3]["name"], "Final");
        let first = &state["matches"][0];
        assert_eq!((first["status"].as_u64(), first["game"].as_u64()), (Some(4), Some(7)));
        assert_eq!(
            first["opponent1"],
            json!({"id": 100, "position": 1, "score": 61, "result": "win"})
        );
        assert_eq!(
            first["opponent2"],
            json!({"id": 115, "position": 16, "score": 55, "result": "loss"})
        );
        assert_eq!(state["matches"][1]["opponent1"], json!({"id": 107, "position": 8}));
        assert_eq!(state["matches"][8]["opponent1"], json!({"id": 100}));
        assert_eq!(state["matches"][8]["opponent2"], json!({"id": null}));
        assert_eq!(state["matches"][8]["status"], 1);
    }
}
