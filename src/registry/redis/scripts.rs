//! The two Lua scripts that keep a room's numbers in Redis: *publish* numbers, stores and sends a
//! publish in one round trip; *reseed* puts back what an emptied Redis lost. Key layout: `keys`.

use redis::Script;

use super::keys::{channel, history_key, ids_key, meta_key};
use super::RedisRegistry;
use crate::core::{EventId, JsonData, Kind, RoomName};
use crate::hub::RoomNumbers;
use crate::registry::envelope::{self, EnvelopeBody};

const PUBLISH_LUA: &str = r#"
-- KEYS: meta, history, event ids. ARGV: kind, data, ts, new epoch, floor, history length, history ttl ms,
-- key ttl s, envelope body, channel, origin node, provisional number ('' when none),
-- publish command (PUBLISH, or SPUBLISH on a cluster), event id (16 hex digits; '' for a state),
-- '1' to publish nothing (answer {'', 0}) when Redis holds no such room: an outbox publish of a
-- room this node does not hold waits for the nodes that hold it to put its numbers back,
-- '1' when a publish Redis numbered before is sent again after Redis was lost (a restore),
-- the epoch and number Redis gave it then ('' and 0 when not a restore).
-- While the room settles after an empty restart (its meta's `settle`, ms since the Unix epoch,
-- set by the first reseed), nothing is numbered anew: the answer is {'', 1} and the publish waits,
-- so that every holder puts back the numbers it knows before a new number can repeat one a
-- holder gave to an event Redis lost.
local function send(epoch, n)
  local x = n
  local number = ''
  for i = 1, 8 do
    number = string.char(x % 256) .. number
    x = math.floor(x / 256)
  end
  redis.call(ARGV[13], ARGV[10], string.char(1) .. number .. string.char(#epoch) .. epoch .. ARGV[9])
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch and ARGV[15] == '1' then return {'', 0} end
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
-- An event id numbered before (an outbox retry whose first answer was lost, or a restore while
-- Redis kept its data): its number again, nothing published twice.
if ARGV[14] ~= '' then
  local seen = redis.call('ZSCORE', KEYS[3], ARGV[14])
  if seen then return {epoch, tonumber(seen)} end
end
if ARGV[16] == '1' and ARGV[1] == 'state' then
  -- A restored state goes only where Redis lost it: under its epoch, when the version the
  -- holders put back is below its own; under another epoch, when the room has no state. Else
  -- a newer state (or this one) is there: answer {epoch, 0}.
  if ARGV[17] == epoch then
    if tonumber(redis.call('HGET', KEYS[1], 'version') or '0') >= tonumber(ARGV[18]) then return {epoch, 0} end
  elseif redis.call('HEXISTS', KEYS[1], 'state') == 1 then
    return {epoch, 0}
  end
end
if ARGV[16] == '1' and ARGV[1] == 'event' and ARGV[17] == epoch then
  -- A restored event of the room's epoch goes under its own number, which Redis gave it before
  -- it lost its data: sent again for a holder that missed it, and put back in the history (after
  -- newer entries: readers order the history by seq) for a holder that re-reads later. When no
  -- holder put the room's seq that far, the seq moves up to it: numbered anew, it would leave a
  -- hole that the holders who had put the seq past it could never fill. Unless this Redis
  -- already gave that number to another event (the room settled before the restore came, and a
  -- fresh publish took it): a holder would drop one of the two as a duplicate, so it is
  -- numbered anew below. `fresh` in the meta hash is the first number this Redis gave a fresh
  -- event after it lost the room (every later fresh number is at or above it; the event ids'
  -- set only keeps the last history-length of them, so it cannot tell alone). It counts until
  -- `fresh_until` (the settle's end and the outbox's resend window: no restore of a number
  -- given before the loss comes later). A room Redis never lost has none: after a failover to
  -- a replica that missed the last numbers, their restores keep them (a fresh number from the
  -- room's start would make every restore look taken, and put it in the history twice).
  local original = tonumber(ARGV[18])
  local fresh = 0
  local fresh_until = tonumber(redis.call('HGET', KEYS[1], 'fresh_until') or '0')
  if fresh_until > 0 then
    local now = redis.call('TIME')
    if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) < fresh_until then
      fresh = tonumber(redis.call('HGET', KEYS[1], 'fresh') or '0')
    else
      redis.call('HDEL', KEYS[1], 'fresh', 'fresh_until')
    end
  end
  local taken = (fresh > 0 and original >= fresh)
    or #redis.call('ZRANGEBYSCORE', KEYS[3], original, original, 'LIMIT', 0, 1) > 0
  if not taken then
    if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') < original then
      redis.call('HSET', KEYS[1], 'seq', original)
    end
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], '*', 'seq', original, 'ts', ARGV[3], 'data', ARGV[2],
      'origin', ARGV[11], 'prov', ARGV[12], 'id', ARGV[14])
    redis.call('PEXPIRE', KEYS[2], ARGV[7])
    redis.call('ZADD', KEYS[3], original, ARGV[14])
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
    send(epoch, original)
    return {epoch, original}
  end
end
local settle = tonumber(redis.call('HGET', KEYS[1], 'settle') or '0')
if settle > 0 then
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) < settle then return {'', 1} end
  redis.call('HDEL', KEYS[1], 'settle')
end
local field = 'seq'
if ARGV[1] == 'state' then field = 'version' end
local n = redis.call('HINCRBY', KEYS[1], field, 1)
local floor = tonumber(ARGV[5])
if n <= floor then
  n = floor + 1
  redis.call('HSET', KEYS[1], field, n)
end
if ARGV[1] == 'event' then
  -- The first fresh number after Redis lost the room, while `fresh_until` holds; after it,
  -- neither field means anything and both go.
  local fresh_until = tonumber(redis.call('HGET', KEYS[1], 'fresh_until') or '0')
  if fresh_until > 0 then
    local now = redis.call('TIME')
    if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) < fresh_until then
      redis.call('HSETNX', KEYS[1], 'fresh', n)
    else
      redis.call('HDEL', KEYS[1], 'fresh', 'fresh_until')
    end
  end
end
if ARGV[1] == 'state' then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'state_ts', ARGV[3])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], '*', 'seq', n, 'ts', ARGV[3], 'data', ARGV[2],
    'origin', ARGV[11], 'prov', ARGV[12], 'id', ARGV[14])
  local now = redis.call('TIME')
  local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[7])
  if oldest > 0 then redis.call('XTRIM', KEYS[2], 'MINID', oldest) end
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  if ARGV[14] ~= '' then
    redis.call('ZADD', KEYS[3], n, ARGV[14])
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', n - tonumber(ARGV[6]))
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[8])
send(epoch, n)
return {epoch, n}
"#;

const RESEED_LUA: &str = r#"
-- KEYS: meta. ARGV: epoch, version, seq, state, state ts, key ttl s, settle ms, resend window ms.
local current = redis.call('HGET', KEYS[1], 'epoch')
if not current then
  -- Redis lost the room: the first holder back puts its numbers back, and the room settles for
  -- `settle ms` (no new numbers; see the publish script) while the other holders put theirs.
  -- Until the resend window after that, a restore is judged against the first fresh number
  -- (`fresh`, `fresh_until`: see the publish script).
  local now = redis.call('TIME')
  local settle = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[7])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'version', ARGV[2], 'seq', ARGV[3], 'settle', settle,
    'fresh_until', settle + tonumber(ARGV[8]))
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[4], 'state_ts', ARGV[5]) end
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  return {ARGV[1], 1}
end
if current == ARGV[1] then
  -- Another holder reseeded first: the newest version wins, with its state.
  if tonumber(redis.call('HGET', KEYS[1], 'version') or '0') < tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'version', ARGV[2])
    if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[4], 'state_ts', ARGV[5]) end
  end
  if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') < tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'seq', ARGV[3])
  end
end
return {current, 0}
"#;

/// The scripts, loaded by `EVALSHA` (and again by the client after Redis restarts).
pub(super) struct Scripts {
    publish: Script,
    reseed: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            publish: Script::new(PUBLISH_LUA),
            reseed: Script::new(RESEED_LUA),
        }
    }
}

/// A publish for the script to number: a fresh one, or one from the outbox.
#[derive(Debug, Clone, Copy)]
pub(super) struct ToNumber<'a> {
    pub room: &'a RoomName,
    pub kind: Kind,
    pub id: Option<EventId>,
    pub data: &'a JsonData,
    pub ts_ms: u64,
    /// The number it was delivered under locally during an outage.
    pub provisional: Option<u64>,
    /// Sent again after Redis was lost, with the epoch and number Redis gave it then: a state
    /// goes only over an older one, an event under its own number if its holders put it back.
    pub restore: Option<(&'a str, u64)>,
}

/// What the publish script did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Numbered {
    /// Numbered and sent (or numbered before, for an event id Redis knows), under that epoch.
    Number(String, u64),
    /// Published nothing: Redis holds no such room and the publish waits for its holders.
    NoSuchRoom,
    /// Published nothing: Redis lost the room and its holders are still putting their numbers
    /// back (`RedisSettings::settle`); the publish waits in the outbox.
    Settling,
    /// Published nothing: a restored state that Redis holds, or a newer one.
    Superseded,
}

impl RedisRegistry {
    /// Runs the publish script: numbers a publish (above `floor`), stores and sends it, and says
    /// under which epoch and number; with `wait_for_holders` it publishes nothing if Redis holds
    /// no such room.
    pub(super) async fn run_publish_script(
        &self,
        publish: ToNumber<'_>,
        floor: u64,
        wait_for_holders: bool,
    ) -> redis::RedisResult<Numbered> {
        let ToNumber {
            room,
            kind,
            id,
            data,
            ts_ms,
            provisional,
            restore,
        } = publish;
        let body = envelope::encode_body(&EnvelopeBody {
            kind: kind.to_byte(),
            ts: ts_ms,
            data: data.as_str(),
            origin: &self.settings.node_id,
            provisional,
            event_id: id.map_or(0, |id| id.0),
        });
        let mut conn = self.commands.clone();
        let (epoch, number): (String, u64) = self
            .scripts
            .publish
            .key(meta_key(room))
            .key(history_key(room))
            .key(ids_key(room))
            .arg(if kind == Kind::State { "state" } else { "event" })
            .arg(data.as_str())
            .arg(ts_ms)
            .arg(self.new_epoch())
            .arg(floor)
            .arg(self.settings.history_len)
            .arg(self.settings.history_ttl.as_millis() as u64)
            .arg(self.settings.state_ttl_s())
            .arg(body)
            .arg(channel(room))
            .arg(&self.settings.node_id)
            .arg(provisional.map(|p| p.to_string()).unwrap_or_default())
            .arg(if self.settings.cluster { "SPUBLISH" } else { "PUBLISH" })
            .arg(id.map(|id| id.to_string()).unwrap_or_default())
            .arg(if wait_for_holders { "1" } else { "" })
            .arg(if restore.is_some() { "1" } else { "" })
            .arg(restore.map_or("", |(epoch, _)| epoch))
            .arg(restore.map_or(0, |(_, number)| number))
            .invoke_async(&mut conn)
            .await?;
        Ok(match (epoch.is_empty(), number) {
            (true, 1) => Numbered::Settling,
            (true, _) => Numbered::NoSuchRoom,
            (false, 0) => Numbered::Superseded,
            (false, n) => Numbered::Number(epoch, n),
        })
    }

    /// Runs the reseed script with what this node holds of the room. When Redis had lost the room,
    /// it now settles (no new numbers for `RedisSettings::settle`): so does the room here, its
    /// publishes waiting in the outbox, so that `/health` says `ok` only once they go to Redis.
    pub(super) async fn reseed(&self, room: &RoomName, numbers: RoomNumbers) -> redis::RedisResult<()> {
        let (data, ts) = numbers
            .state
            .as_ref()
            .map_or((String::new(), 0), |s| (s.data().to_string(), s.ts_ms));
        self.scripts
            .reseed
            .key(meta_key(room))
            .arg(numbers.epoch)
            .arg(numbers.version)
            .arg(numbers.seq)
            .arg(data)
            .arg(ts)
            .arg(self.settings.state_ttl_s())
            .arg(self.settings.settle().as_millis() as u64)
            .arg(self.settings.resend_window.as_millis() as u64)
            .invoke_async::<(String, u8)>(&mut self.commands.clone())
            .await
            .map(|(_, settling)| {
                if settling == 1 {
                    self.wait_for_holders(room);
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redis-server on a free loopback port (tests/run.sh installs it), killed on drop.
    struct TestRedis(std::process::Child, u16);

    impl TestRedis {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("port")
                .port();
            let server = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (apt-get install redis-server)");
            Self(server, port)
        }

        /// A connection, once the server accepts one (within 10 s, or the test fails).
        async fn connect(&self) -> redis::aio::MultiplexedConnection {
            let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.1)).expect("client");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                match client.get_multiplexed_async_connection().await {
                    Ok(conn) => return conn,
                    Err(error) if std::time::Instant::now() > deadline => {
                        panic!("redis-server never answered: {error}")
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Runs the publish script as a node would (history of 1,000, no floor).
    async fn publish(
        conn: &mut redis::aio::MultiplexedConnection,
        room: &RoomName,
        kind: &str,
        data: &str,
        ts: u64,
        id: &str,
        restore: Option<(&str, u64)>,
    ) -> (String, u64) {
        Script::new(PUBLISH_LUA)
            .key(meta_key(room))
            .key(history_key(room))
            .key(ids_key(room))
            .arg(kind)
            .arg(data)
            .arg(ts)
            .arg("ep")
            .arg(0)
            .arg(1000)
            .arg(600_000)
            .arg(60)
            .arg(Vec::<u8>::new())
            .arg(channel(room))
            .arg("n1")
            .arg("")
            .arg("PUBLISH")
            .arg(id)
            .arg("")
            .arg(if restore.is_some() { "1" } else { "" })
            .arg(restore.map_or("", |r| r.0))
            .arg(restore.map_or(0, |r| r.1))
            .invoke_async(conn)
            .await
            .expect("script")
    }

    /// An event id sent again gets its first number back, and nothing is stored or published twice.
    #[tokio::test]
    async fn the_publish_script_numbers_an_event_id_once() {
        let redis = TestRedis::start();
        let mut conn = redis.connect().await;
        let room = RoomName::parse("game:once").expect("room");
        let first = publish(&mut conn, &room, "event", "1", 1, "00000000000000a1", None)
            .await
            .1;
        let again = publish(&mut conn, &room, "event", "1", 1, "00000000000000a1", Some(("ep", 1)))
            .await
            .1;
        let other = publish(&mut conn, &room, "event", "1", 1, "00000000000000b2", None)
            .await
            .1;
        let stored: u64 = redis::cmd("XLEN")
            .arg(history_key(&room))
            .query_async(&mut conn)
            .await
            .expect("xlen");
        assert_eq!((first, again, other, stored), (1, 1, 2, 2));
    }

    /// A state sent again after Redis was lost goes only where Redis lost it, judged by Redis's
    /// own numbers (never by clocks): not over itself or a newer version, and over another
    /// epoch only where the room has no state.
    #[tokio::test]
    async fn a_restored_state_never_replaces_a_newer_one() {
        let redis = TestRedis::start();
        let mut conn = redis.connect().await;
        let room = RoomName::parse("game:restore").expect("room");
        let mut state = async |data: &str, ts: u64, restore: Option<(&str, u64)>| {
            publish(&mut conn, &room, "state", data, ts, "", restore).await.1
        };
        assert_eq!(state("{\"s\":1}", 100, None).await, 1);
        assert_eq!(state("{\"s\":2}", 90, None).await, 2, "a clock behind does not matter");
        assert_eq!(state("{\"s\":1}", 100, Some(("ep", 1))).await, 0, "an older version");
        assert_eq!(state("{\"s\":2}", 90, Some(("ep", 2))).await, 0, "the same version");
        assert_eq!(
            state("{\"s\":0}", 200, Some(("other", 9))).await,
            0,
            "another epoch, a state there"
        );
        // Redis lost version 3: its holders put back version 2.
        assert_eq!(state("{\"s\":3}", 80, Some(("ep", 3))).await, 3, "lost: sent again");
        let stored: String = redis::cmd("HGET")
            .arg(meta_key(&room))
            .arg("state")
            .query_async(&mut conn)
            .await
            .expect("hget");
        assert_eq!(stored, "{\"s\":3}");
    }

    /// An event Redis lost with its data (its id unknown), sent again by its publisher: under its
    /// own number (and in the history), whether the holders put the room back at or past it or
    /// not (then the seq moves up to it: the campaign's seed 8547977274803114219, where a lagging
    /// holder's reseed and the restore's fresh number left a hole another holder's reseed had
    /// put the seq past); numbered anew under another epoch.
    #[tokio::test]
    async fn a_restored_event_keeps_its_number_when_the_holders_put_it_back() {
        let redis = TestRedis::start();
        let mut conn = redis.connect().await;
        let room = RoomName::parse("game:restore").expect("room");
        // The holders reseeded the emptied Redis: epoch "ep", seq 5.
        let _: () = redis::cmd("HSET")
            .arg(meta_key(&room))
            .arg("epoch")
            .arg("ep")
            .arg("seq")
            .arg(5)
            .query_async(&mut conn)
            .await
            .expect("hset");
        let put_back = publish(&mut conn, &room, "event", "4", 1, "00000000000000c4", Some(("ep", 4))).await;
        assert_eq!(put_back, ("ep".to_string(), 4));
        let again = publish(&mut conn, &room, "event", "4", 1, "00000000000000c4", Some(("ep", 4))).await;
        assert_eq!(again.1, 4, "and only once");
        let beyond = publish(&mut conn, &room, "event", "9", 1, "00000000000000c9", Some(("ep", 9))).await;
        assert_eq!(
            beyond.1, 9,
            "the holders never got that far: its own number all the same, the seq moved up to it"
        );
        let other_epoch = publish(&mut conn, &room, "event", "3", 1, "00000000000000d3", Some(("old", 3))).await;
        assert_eq!(other_epoch.1, 10, "another epoch: numbered after");
        let stored: u64 = redis::cmd("XLEN")
            .arg(history_key(&room))
            .query_async(&mut conn)
            .await
            .expect("xlen");
        assert_eq!(stored, 3, "the event sent under its own number is in the history too");
    }

    /// A restore that comes after the room settled, its number already given to a fresh publish
    /// by this Redis (the campaign's seeds 4140744046560954069 and 8085167026760167933): numbered
    /// anew, never under the number another event holds (a holder would drop one of the two).
    #[tokio::test]
    async fn a_restored_event_never_takes_a_number_another_event_holds() {
        let redis = TestRedis::start();
        let mut conn = redis.connect().await;
        let room = RoomName::parse("game:taken").expect("room");
        // A lagging holder reseeded seq 5 and the room settled; a fresh publish took 6.
        reseed(&conn, &room, (0, 5), ("", 0), 0).await;
        let fresh = publish(&mut conn, &room, "event", "f", 1, "00000000000000f6", None).await;
        assert_eq!(fresh, ("ep".to_string(), 6));
        // The old Redis had given 6 to another event, whose publisher now sends it again.
        let restored = publish(&mut conn, &room, "event", "r", 1, "00000000000000a6", Some(("ep", 6))).await;
        assert_eq!(restored, ("ep".to_string(), 7), "numbered anew, after the fresh one");
        let seqs: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(history_key(&room))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("xrange");
        let seqs: Vec<String> = seqs
            .iter()
            .filter_map(|(_, fields)| fields.iter().find(|(k, _)| k == "seq").map(|(_, v)| v.clone()))
            .collect();
        assert_eq!(seqs, ["6", "7"], "one event per number in the history");
        // A restore whose number nobody took still goes under it.
        let free = publish(&mut conn, &room, "event", "r", 1, "00000000000000a5", Some(("ep", 5))).await;
        assert_eq!(free, ("ep".to_string(), 5));
        // Taken long ago: the ids' set no longer holds the number (trimmed to the history's
        // length), and the restore is numbered anew all the same.
        let _: () = redis::cmd("ZREMRANGEBYSCORE")
            .arg(ids_key(&room))
            .arg(6)
            .arg(6)
            .query_async(&mut conn)
            .await
            .expect("trim");
        let late = publish(&mut conn, &room, "event", "l", 1, "00000000000000b6", Some(("ep", 6))).await;
        assert_eq!(late, ("ep".to_string(), 8), "a fresh event took 6 in this Redis");
    }

    /// A failover to a lagging replica: the promoted replica kept the room's meta hash (`fresh`
    /// included, set by the old master at the room's first event) but not the last events the old
    /// master numbered. A holder that had received them reseeds first (seq moves up past them);
    /// their publisher then restores them. Nobody in this Redis holds their numbers: they should go
    /// under them, not anew after the reseeded seq (a hole at 5 and 6, the events again at 7 and 8).
    #[tokio::test]
    async fn a_restored_event_keeps_its_free_number_after_a_failover() {
        let redis = TestRedis::start();
        let mut conn = redis.connect().await;
        let room = RoomName::parse("game:failover").expect("room");
        // Numbered and replicated before the failover: 1 to 4 (the first set `fresh` to 1).
        for (i, id) in [
            "00000000000000f1",
            "00000000000000f2",
            "00000000000000f3",
            "00000000000000f4",
        ]
        .iter()
        .enumerate()
        {
            let fresh = publish(&mut conn, &room, "event", "f", 1, id, None).await;
            assert_eq!(fresh, ("ep".to_string(), i as u64 + 1));
        }
        // The old master numbered 5 and 6 (a holder received both live), then died before its
        // replica got them. The holder's reseed puts the seq back to 6.
        reseed(&conn, &room, (0, 6), ("", 0), 0).await;
        let five = publish(&mut conn, &room, "event", "r", 1, "00000000000000a5", Some(("ep", 5))).await;
        let six = publish(&mut conn, &room, "event", "r", 1, "00000000000000a6", Some(("ep", 6))).await;
        assert_eq!(
            (five.1, six.1),
            (5, 6),
            "numbers this Redis never gave another event: the restores keep them"
        );
    }

    /// `fresh` counts only until the resend window after the loss's settle: then no restore of a
    /// number given before the loss can come, and a later failover's restores (of numbers this
    /// Redis gave after the loss, which a replica missed) keep their numbers.
    #[tokio::test]
    async fn fresh_counts_only_until_the_resend_window_after_the_loss() {
        let redis = TestRedis::start();
        let mut conn = redis.connect().await;
        let mut restored_after = async |room: &str, expired: bool| {
            let room = RoomName::parse(room).expect("room");
            // Redis lost the room; a holder put back seq 5; a fresh publish took 6.
            reseed(&conn, &room, (0, 5), ("", 0), 0).await;
            let fresh = publish(&mut conn, &room, "event", "f", 1, "00000000000000f6", None).await;
            assert_eq!(fresh.1, 6);
            if expired {
                let _: () = redis::cmd("HSET")
                    .arg(meta_key(&room))
                    .arg("fresh_until")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .expect("hset");
            }
            // A failover lost 7, which a holder had received (its reseed puts the seq at 7).
            reseed(&conn, &room, (0, 7), ("", 0), 0).await;
            let restored = publish(&mut conn, &room, "event", "r", 1, "00000000000000a7", Some(("ep", 7))).await;
            let fresh_left: bool = redis::cmd("HEXISTS")
                .arg(meta_key(&room))
                .arg("fresh")
                .query_async(&mut conn)
                .await
                .expect("hexists");
            (restored.1, fresh_left)
        };
        assert_eq!(
            restored_after("game:window", false).await,
            (8, true),
            "inside the window 7 could be a number given before the loss: numbered anew"
        );
        assert_eq!(
            restored_after("game:after", true).await,
            (7, false),
            "after it, a number nobody in this Redis holds is kept, and `fresh` is gone"
        );
    }

    async fn reseed(
        conn: &redis::aio::MultiplexedConnection,
        room: &RoomName,
        (version, seq): (u64, u64),
        (state, ts): (&str, u64),
        settle_ms: u64,
    ) -> (String, u8) {
        Script::new(RESEED_LUA)
            .key(meta_key(room))
            .arg("ep")
            .arg(version)
            .arg(seq)
            .arg(state)
            .arg(ts)
            .arg(60)
            .arg(settle_ms)
            .arg(60_000)
            .invoke_async(&mut conn.clone())
            .await
            .expect("reseed")
    }

    /// Two holders reseed an emptied Redis: the newest version wins with its own state; the
    /// first to put the room back says it settles.
    #[tokio::test]
    async fn the_newest_reseed_brings_its_state() {
        let redis = TestRedis::start();
        let conn = redis.connect().await;
        let room = RoomName::parse("game:reseed").expect("room");
        let first = reseed(&conn, &room, (1, 0), ("{\"old\":1}", 10), 0).await;
        assert_eq!(first, ("ep".to_string(), 1), "the room was lost: it settles");
        let second = reseed(&conn, &room, (2, 0), ("{\"new\":2}", 20), 0).await;
        assert_eq!(second, ("ep".to_string(), 0));
        reseed(&conn, &room, (1, 0), ("{\"old\":1}", 10), 0).await;
        let mut conn = conn.clone();
        let (version, state, ts): (u64, String, u64) = redis::cmd("HMGET")
            .arg(meta_key(&room))
            .arg("version")
            .arg("state")
            .arg("state_ts")
            .query_async(&mut conn)
            .await
            .expect("hmget");
        assert_eq!((version, state.as_str(), ts), (2, "{\"new\":2}", 20));
    }

    /// While a room Redis lost settles, nothing is numbered anew in it (a lagging holder's numbers
    /// could repeat one another holder gave a lost event); a restore under its own number goes.
    #[tokio::test]
    async fn a_room_put_back_settles_before_new_numbers() {
        let redis = TestRedis::start();
        let mut conn = redis.connect().await;
        let room = RoomName::parse("game:settle").expect("room");
        reseed(&conn, &room, (0, 5), ("", 0), 60_000).await;
        // Another holder knew more: the highest seq wins.
        reseed(&conn, &room, (0, 8), ("", 0), 60_000).await;
        let fresh = publish(&mut conn, &room, "event", "1", 1, "00000000000000e1", None).await;
        assert_eq!(fresh, (String::new(), 1), "settling: not numbered");
        let state = publish(&mut conn, &room, "state", "{}", 1, "", None).await;
        assert_eq!(state, (String::new(), 1), "nor is a state");
        let restored = publish(&mut conn, &room, "event", "7", 1, "00000000000000e7", Some(("ep", 7))).await;
        assert_eq!(restored, ("ep".to_string(), 7), "a restore under its own number goes");
        let _: () = redis::cmd("HSET")
            .arg(meta_key(&room))
            .arg("settle")
            .arg(1)
            .query_async(&mut conn)
            .await
            .expect("settled");
        let after = publish(&mut conn, &room, "event", "1", 1, "00000000000000e1", None).await;
        assert_eq!(
            after,
            ("ep".to_string(), 9),
            "settled: numbered after what the holders put back"
        );
    }
}
