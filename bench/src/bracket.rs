//! A single-elimination bracket in the shape of npm `brackets-model` (participants, stage,
//! group, rounds, matches with `opponent1`/`opponent2` `{id, position, score, result}` and a
//! status 0-5), finished one match at a time: the states the delta bench and tests publish.
//! Deterministic: the same size gives the same bytes.

use serde_json::{json, Value};

/// `brackets-model`'s `Status`: Locked, Waiting, Ready, Running, Completed.
const LOCKED: u8 = 0;
const READY: u8 = 2;
const RUNNING: u8 = 3;
const COMPLETED: u8 = 4;

const CITIES: [&str; 8] = [
    "Phoenix",
    "Mesa",
    "Tempe",
    "Chandler",
    "Gilbert",
    "Glendale",
    "Scottsdale",
    "Peoria",
];
const NAMES: [&str; 8] = [
    "Suns",
    "Coyotes",
    "Roadrunners",
    "Scorpions",
    "Hawks",
    "Javelinas",
    "Monsoon",
    "Saguaros",
];

#[derive(Debug, Clone)]
struct Opponent {
    id: Option<u32>,
    position: Option<u32>,
    score: Option<u32>,
    result: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct Match {
    round: u32,
    number: u32,
    status: u8,
    opponents: [Opponent; 2],
}

/// A bracket of `teams` (a power of two) participants and the matches played so far.
#[derive(Debug, Clone)]
pub struct Bracket {
    teams: u32,
    matches: Vec<Match>,
    /// Matches completed, in play order: the next one `advance` finishes.
    played: usize,
}

impl Bracket {
    pub fn new(teams: u32) -> Self {
        let empty = |position| Opponent {
            id: None,
            position,
            score: None,
            result: None,
        };
        let mut matches = Vec::new();
        let rounds = teams.trailing_zeros();
        for round in 1..=rounds {
            for number in 1..=(teams >> round) {
                let first = round == 1;
                let seat = |side: u32| {
                    let position = (number - 1) * 2 + side + 1;
                    let mut o = empty(first.then_some(position));
                    o.id = first.then_some(position - 1);
                    o
                };
                matches.push(Match {
                    round,
                    number,
                    status: if first { READY } else { LOCKED },
                    opponents: [seat(0), seat(1)],
                });
            }
        }
        Self {
            teams,
            matches,
            played: 0,
        }
    }

    /// Matches in the bracket (teams - 1).
    pub fn match_count(&self) -> usize {
        self.matches.len()
    }

    /// Marks the next match running with a score: one match's fields change (a live update).
    pub fn score_next(&mut self, home: u32, away: u32) {
        if let Some(m) = self.matches.get_mut(self.played) {
            m.status = RUNNING;
            m.opponents[0].score = Some(home);
            m.opponents[1].score = Some(away);
        }
    }

    /// Finishes the next match (the higher seed's side wins unless `upset`) and moves its winner
    /// into the next round: the change a bracket sees when a game ends.
    pub fn advance(&mut self, upset: bool) {
        let Some(m) = self.matches.get_mut(self.played) else {
            return;
        };
        let (round, number) = (m.round, m.number);
        let winner_side = usize::from(upset);
        let (w, l) = (58 + (number * 7 + round * 3) % 30, 41 + (number * 5 + round) % 16);
        m.status = COMPLETED;
        m.opponents[winner_side].score = Some(w);
        m.opponents[winner_side].result = Some("win");
        m.opponents[1 - winner_side].score = Some(l);
        m.opponents[1 - winner_side].result = Some("loss");
        let winner = m.opponents[winner_side].id;
        self.played += 1;
        let next_number = number.div_ceil(2);
        if let Some(next) = self
            .matches
            .iter_mut()
            .find(|n| n.round == round + 1 && n.number == next_number)
        {
            next.opponents[((number - 1) % 2) as usize].id = winner;
            if next.opponents.iter().all(|o| o.id.is_some()) {
                next.status = READY;
            }
        }
    }

    /// The state as published: compact JSON, keys in a fixed order.
    pub fn to_json(&self) -> String {
        let participants: Vec<Value> = (0..self.teams)
            .map(|id| {
                json!({"id": id, "tournament_id": 0,
                       "name": format!("{} {} {}", CITIES[id as usize % 8], NAMES[(id as usize / 8) % 8], 10 + id % 5)})
            })
            .collect();
        let rounds = self.teams.trailing_zeros();
        let round_list: Vec<Value> = (1..=rounds)
            .map(|n| json!({"id": n - 1, "number": n, "stage_id": 0, "group_id": 0}))
            .collect();
        let opponent = |o: &Opponent| {
            if o.id.is_none() && o.position.is_none() {
                return Value::Null;
            }
            let mut v = json!({"id": o.id});
            if let Some(p) = o.position {
                v["position"] = p.into();
            }
            if let Some(s) = o.score {
                v["score"] = s.into();
            }
            if let Some(r) = o.result {
                v["result"] = r.into();
            }
            v
        };
        let matches: Vec<Value> = self
            .matches
            .iter()
            .enumerate()
            .map(|(id, m)| {
                json!({"id": id, "stage_id": 0, "group_id": 0, "round_id": m.round - 1, "number": m.number,
                       "child_count": 0, "status": m.status,
                       "opponent1": opponent(&m.opponents[0]), "opponent2": opponent(&m.opponents[1])})
            })
            .collect();
        json!({
            "participant": participants,
            "stage": [{"id": 0, "tournament_id": 0, "name": "Saturday Playoffs", "type": "single_elimination", "number": 1,
                       "settings": {"size": self.teams, "seedOrdering": ["natural"], "grandFinal": "none"}}],
            "group": [{"id": 0, "stage_id": 0, "number": 1}],
            "round": round_list,
            "match": matches,
        })
        .to_string()
    }
}
