//! Fossil deltas (the format of the Fossil VCS's `delta.c`, which Centrifugo and the npm package
//! `fossil-delta` speak): a state sent as the bytes that changed since the version a subscriber
//! holds. Hand-written (about 200 lines) because the one crate's `apply` panics on bad input;
//! its deltas apply with npm's `applyDelta` and courtside.js (docs/PROTOCOL.md, test vectors).

/// States shorter than this are always sent whole, and no delta work is done for them: a
/// score's 100–300 bytes gain little and would cost a delta computation per publish.
pub const MIN_STATE_BYTES: usize = 1024;

/// States longer than this are always sent whole: a delta's worst case grows with the state
/// (see `WORK_PER_BYTE`), and brackets, the states deltas are for, are tens of kilobytes (a
/// 256-team one in brackets-model's shape: 66 KB).
pub const MAX_STATE_BYTES: usize = 128 * 1024;

/// The match search's budget per byte of base and target, beyond `WORK_BASE`: every change of
/// 16-, 64- and 256-team brackets took at most 1, while crafted input (a periodic base and its
/// reverse) would take 250 per byte: 3.3 s for a megabyte on this project's machine, where the
/// budget stops a crafted 128 KiB state within 10 ms (8.4 ms measured). Past the budget, no
/// delta: the state goes whole. Deterministic, so every node gives up on the same states.
pub const WORK_PER_BYTE: usize = 4;

/// The budget every delta has whatever its size.
pub const WORK_BASE: usize = 64 * 1024;

/// The one delta format, named in `subscribe` as `"delta":"fossil"`.
pub const FORMAT: &str = "fossil";

/// Why a delta could not be applied (a client's concern; the server only makes deltas).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta ends too early")]
    Truncated,
    #[error("delta has an unknown operator {0:#04x}")]
    UnknownOperator(u8),
    #[error("delta copies past the end of its base")]
    CopyOutOfBase,
    #[error("delta writes more than its announced size")]
    TooLong,
    #[error("delta's output does not match its announced size")]
    WrongSize,
    #[error("delta's checksum does not match: wrong base")]
    BadChecksum,
}

const NHASH: usize = 16;

const DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";

/// The 64-ary digit's value, or `None` for a byte that ends a number.
fn digit_value(byte: u8) -> Option<u32> {
    match byte {
        b'0'..=b'9' => Some(u32::from(byte - b'0')),
        b'A'..=b'Z' => Some(u32::from(byte - b'A') + 10),
        b'_' => Some(36),
        b'a'..=b'z' => Some(u32::from(byte - b'a') + 37),
        b'~' => Some(63),
        _ => None,
    }
}

fn put_int(out: &mut Vec<u8>, mut v: u32) {
    if v == 0 {
        out.push(b'0');
        return;
    }
    let mut buf = [0u8; 6];
    let mut i = 0;
    while v > 0 {
        buf[i] = DIGITS[(v & 0x3f) as usize];
        v >>= 6;
        i += 1;
    }
    out.extend(buf[..i].iter().rev());
}

fn digit_count(v: usize) -> usize {
    let (mut i, mut x) = (1, 64u128);
    while v as u128 >= x {
        i += 1;
        x <<= 6;
    }
    i
}

/// Fossil's checksum: the sum of the big-endian 32-bit words, the tail padded with zeros.
fn checksum(bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(4);
    let mut sum = 0u32;
    for word in &mut chunks {
        sum = sum.wrapping_add(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    let mut tail = [0u8; 4];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    sum.wrapping_add(u32::from_be_bytes(tail))
}

/// Fossil's rolling hash over a 16-byte window.
struct RollingHash {
    a: u16,
    b: u16,
    i: usize,
    z: [u8; NHASH],
}

impl RollingHash {
    fn new(z: &[u8]) -> Self {
        let (mut a, mut b) = (0u16, 0u16);
        let mut window = [0u8; NHASH];
        for (i, &x) in z[..NHASH].iter().enumerate() {
            a = a.wrapping_add(u16::from(x));
            b = b.wrapping_add(((NHASH - i) as u16).wrapping_mul(u16::from(x)));
            window[i] = x;
        }
        Self { a, b, i: 0, z: window }
    }

    fn next(&mut self, c: u8) {
        let old = self.z[self.i];
        self.z[self.i] = c;
        self.i = (self.i + 1) & (NHASH - 1);
        self.a = self.a.wrapping_sub(u16::from(old)).wrapping_add(u16::from(c));
        self.b = self
            .b
            .wrapping_sub((NHASH as u16).wrapping_mul(u16::from(old)))
            .wrapping_add(self.a);
    }

    fn value(&self) -> u32 {
        u32::from(self.a) | (u32::from(self.b) << 16)
    }
}

/// The delta that turns `source` into `target`: a fossil delta that every fossil decoder
/// applies (fossil's `delta_apply`, npm `fossil-delta`'s `applyDelta`, courtside.js). The search
/// is fossil's `delta_create` but for one step: where `delta_create` takes the first match that
/// pays, this one takes it only if it is `LONG_MATCH` bytes or more, and otherwise looks at the
/// next `NHASH` positions for a match that saves more. A bracket repeats the same structure for
/// every match, and `delta_create` copies from look-alikes, a few bytes at a time: over a
/// 64-team bracket's 63 one-match changes its deltas averaged 142 bytes, these 74. So the bytes
/// differ from `createDelta`'s. Lengths above 4 GiB are not supported (states are at most the
/// 1 MiB body limit). Its time has no bound but the inputs' (see `create_within`).
pub fn create(source: &[u8], target: &[u8]) -> Vec<u8> {
    create_within(source, target, usize::MAX).unwrap_or_default()
}

/// The search's work for a delta from `source` to `target` under the server's budget.
pub fn budget(source: &[u8], target: &[u8]) -> usize {
    WORK_BASE.saturating_add(WORK_PER_BYTE.saturating_mul(source.len().saturating_add(target.len())))
}

/// A match at least this long is taken at once; a shorter one only after the next `NHASH`
/// positions were searched for a better one (see `create`).
const LONG_MATCH: usize = 64;

/// `create`, or `None` once the match search has done `budget` steps (a candidate block, or a
/// byte compared): the same delta whenever it finishes within the budget.
pub fn create_within(source: &[u8], target: &[u8], budget: usize) -> Option<Vec<u8>> {
    let mut work: usize = 0;
    let (len_src, len_out) = (source.len(), target.len());
    let mut out = Vec::with_capacity(64);
    put_int(&mut out, len_out as u32);
    out.push(b'\n');
    let literal = |out: &mut Vec<u8>, bytes: &[u8]| {
        put_int(out, bytes.len() as u32);
        out.push(b':');
        out.extend_from_slice(bytes);
    };
    if len_src <= NHASH {
        literal(&mut out, target);
        put_int(&mut out, checksum(target));
        out.push(b';');
        return Some(out);
    }
    // Landmarks: the hash of every 16-byte block of the source, chained by collision.
    let n_hash = len_src.div_ceil(NHASH);
    let mut collide = vec![usize::MAX; n_hash];
    let mut landmark = vec![usize::MAX; n_hash];
    let mut i = 0;
    while i < len_src - NHASH {
        let hv = RollingHash::new(&source[i..]).value() as usize % n_hash;
        collide[i / NHASH] = landmark[hv];
        landmark[hv] = i / NHASH;
        i += NHASH;
    }
    let mut base = 0;
    while base + NHASH < len_out {
        let mut h = RollingHash::new(&target[base..]);
        let mut i = 0;
        let (mut best_cnt, mut best_ofst, mut best_litsz) = (0, 0, 0);
        let mut best_score: isize = 0;
        let mut lookahead_left = NHASH;
        loop {
            if best_cnt > 0 {
                lookahead_left = lookahead_left.saturating_sub(1);
            }
            let mut limit = 250;
            let mut block = landmark[h.value() as usize % n_hash];
            while block != usize::MAX && limit > 0 {
                limit -= 1;
                let i_src = block * NHASH;
                // Forward from the landmark, then backward into the literal before it.
                let forward = source[i_src..]
                    .iter()
                    .zip(&target[base + i..])
                    .take_while(|(s, t)| s == t)
                    .count();
                let j = forward as isize - 1;
                let mut k = 1;
                while k < i_src && k <= i && source[i_src - k] == target[base + i - k] {
                    k += 1;
                }
                let k = k - 1;
                work = work.saturating_add(1 + forward + k);
                if work > budget {
                    return None;
                }
                let cnt = (j + k as isize + 1) as usize;
                let litsz = i - k;
                let sz = digit_count(litsz) + digit_count(cnt) + digit_count(i_src - k) + 3;
                // What the copy saves over sending its bytes as literal, less the literal before it
                // (which a later copy may still cover when this one is not taken).
                let score = cnt as isize - sz as isize - litsz as isize;
                if cnt >= sz && (best_cnt == 0 || score > best_score) {
                    best_cnt = cnt;
                    best_ofst = i_src - k;
                    best_litsz = litsz;
                    best_score = score;
                }
                block = collide[block];
            }
            if best_cnt > 0 && (best_cnt >= LONG_MATCH || lookahead_left == 0 || base + i + NHASH >= len_out) {
                if best_litsz > 0 {
                    literal(&mut out, &target[base..base + best_litsz]);
                    base += best_litsz;
                }
                base += best_cnt;
                put_int(&mut out, best_cnt as u32);
                out.push(b'@');
                put_int(&mut out, best_ofst as u32);
                out.push(b',');
                break;
            }
            if base + i + NHASH >= len_out {
                literal(&mut out, &target[base..]);
                base = len_out;
                break;
            }
            h.next(target[base + i + NHASH]);
            i += 1;
        }
    }
    if base < len_out {
        literal(&mut out, &target[base..]);
    }
    put_int(&mut out, checksum(target));
    out.push(b';');
    Some(out)
}

/// Reads a delta's numbers and operators; every read is checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn int(&mut self) -> Result<usize, DeltaError> {
        let mut v: usize = 0;
        let start = self.pos;
        while let Some(d) = self.bytes.get(self.pos).copied().and_then(digit_value) {
            v = v
                .checked_mul(64)
                .and_then(|v| v.checked_add(d as usize))
                .ok_or(DeltaError::TooLong)?;
            self.pos += 1;
        }
        if self.pos == start && self.pos >= self.bytes.len() {
            return Err(DeltaError::Truncated);
        }
        Ok(v)
    }

    fn byte(&mut self) -> Result<u8, DeltaError> {
        let b = *self.bytes.get(self.pos).ok_or(DeltaError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
}

/// Applies `delta` to `source`: the target, or why not. Never panics and never allocates more
/// than the size the delta announces, capped at `max_len`.
pub fn apply(source: &[u8], delta: &[u8], max_len: usize) -> Result<Vec<u8>, DeltaError> {
    let mut r = Reader { bytes: delta, pos: 0 };
    let limit = r.int()?;
    if r.byte()? != b'\n' {
        return Err(DeltaError::UnknownOperator(delta[r.pos - 1]));
    }
    if limit > max_len {
        return Err(DeltaError::TooLong);
    }
    let mut out = Vec::with_capacity(limit);
    loop {
        let cnt = r.int()?;
        match r.byte()? {
            b'@' => {
                let ofst = r.int()?;
                if r.byte()? != b',' {
                    return Err(DeltaError::UnknownOperator(delta[r.pos - 1]));
                }
                if out.len().saturating_add(cnt) > limit {
                    return Err(DeltaError::TooLong);
                }
                let end = ofst.checked_add(cnt).ok_or(DeltaError::CopyOutOfBase)?;
                out.extend_from_slice(source.get(ofst..end).ok_or(DeltaError::CopyOutOfBase)?);
            }
            b':' => {
                if out.len().saturating_add(cnt) > limit {
                    return Err(DeltaError::TooLong);
                }
                let text = delta.get(r.pos..r.pos + cnt).ok_or(DeltaError::Truncated)?;
                out.extend_from_slice(text);
                r.pos += cnt;
            }
            b';' => {
                if out.len() != limit {
                    return Err(DeltaError::WrongSize);
                }
                if cnt as u64 != u64::from(checksum(&out)) {
                    return Err(DeltaError::BadChecksum);
                }
                return Ok(out);
            }
            other => return Err(DeltaError::UnknownOperator(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests need no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn the_fossil_documentation_example() {
        // Short sources are one literal; numbers are base 64 (`C` is 12).
        let d = create(b"abc", b"hello world!");
        assert_eq!(&d[..5], b"C\nC:h");
        assert_eq!(apply(b"abc", &d, 1 << 20).expect("applies"), b"hello world!");
        assert_eq!(create(b"", b""), b"0\n0:0;");
    }

    #[test]
    fn a_small_change_in_a_long_text_is_a_few_copies_and_one_literal() {
        let source: String = (0..200).map(|i| format!("{{\"id\":{i},\"score\":null}},")).collect();
        let target = source.replacen("\"id\":57,\"score\":null", "\"id\":57,\"score\":78", 1);
        let d = create(source.as_bytes(), target.as_bytes());
        assert!(d.len() < 40, "{}", String::from_utf8_lossy(&d));
        assert_eq!(
            apply(source.as_bytes(), &d, 1 << 20).expect("applies"),
            target.as_bytes()
        );
    }

    #[test]
    fn a_change_in_a_repetitive_text_copies_from_its_own_place_not_from_look_alikes() {
        // Sixty-four matches that differ only in their numbers, as a bracket's do.
        const MATCHES: usize = 64;
        let bracket = |finished: &[(usize, u32, u32)]| -> String {
            (0..MATCHES)
                .map(|id| {
                    let (one, two) = finished
                        .iter()
                        .find(|(m, _, _)| *m == id)
                        .map_or(("{\"id\":null}".to_string(), "{\"id\":null}".to_string()), |(_, a, b)| {
                            (format!("{{\"id\":{a},\"result\":\"win\"}}"), format!("{{\"id\":{b},\"result\":\"loss\"}}"))
                        });
                    format!("{{\"id\":{id},\"group_id\":0,\"number\":{},\"opponent1\":{one},\"opponent2\":{two},\"round_id\":{},\"status\":2}},", id % 32 + 1, id / 32)
                })
                .collect()
        };
        let (source, target) = (bracket(&[(3, 6, 7)]), bracket(&[(3, 6, 7), (40, 11, 12)]));
        let d = create(source.as_bytes(), target.as_bytes());
        assert_eq!(
            apply(source.as_bytes(), &d, 1 << 20).expect("applies"),
            target.as_bytes()
        );
        // fossil's delta_create takes the first match that pays and makes 64 bytes here.
        assert!(d.len() <= 56, "{} bytes: {}", d.len(), String::from_utf8_lossy(&d));
    }

    #[test]
    fn every_change_of_a_256_team_bracket_stays_within_the_budget() {
        let mut matches: Vec<String> = (0..255)
            .map(|id| format!("{{\"id\":{id},\"opponent1\":{{\"id\":null}},\"opponent2\":{{\"id\":null}},\"round_id\":{},\"status\":2}}", id / 128))
            .collect();
        let mut before = matches.join(",");
        for id in 0..255 {
            matches[id] = format!("{{\"id\":{id},\"opponent1\":{{\"id\":{},\"result\":\"win\",\"score\":61}},\"opponent2\":{{\"id\":{},\"result\":\"loss\",\"score\":48}},\"round_id\":{},\"status\":4}}", 2 * id, 2 * id + 1, id / 128);
            let after = matches.join(",");
            let (a, b) = (before.as_bytes(), after.as_bytes());
            let d = create_within(a, b, budget(a, b)).unwrap_or_else(|| panic!("change {id} ran out of budget"));
            assert!(d.len() < 200, "change {id}: {} bytes", d.len());
            before = after;
        }
    }

    #[test]
    fn round_trips_random_edits() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300 {
            let len = rng.below(3000);
            let source: Vec<u8> = (0..len).map(|_| b"abcdefgh{}\":,0123"[rng.below(17)]).collect();
            let mut target = source.clone();
            for _ in 0..rng.below(6) {
                let at = rng.below(target.len() + 1);
                match rng.below(3) {
                    0 => target.insert(at, b"xyz"[rng.below(3)]),
                    1 if at < target.len() => {
                        target.remove(at);
                    }
                    _ => {
                        let end = (at + rng.below(50)).min(target.len());
                        target[at..end].reverse();
                    }
                }
            }
            let d = create(&source, &target);
            assert_eq!(apply(&source, &d, 1 << 20).expect("applies"), target);
        }
    }

    #[test]
    fn crafted_input_runs_out_of_budget_instead_of_time() {
        // A periodic base and its reverse: 250 candidates at every byte without the budget.
        let source: Vec<u8> = (0..64 * 1024).map(|i| b"abcdefghijklmnop"[i % 16]).collect();
        let mut target = source.clone();
        target.reverse();
        assert_eq!(create_within(&source, &target, budget(&source, &target)), None);
        // An ordinary change of a long text stays well within it, and is `create`'s delta.
        let text: String = (0..2000).map(|i| format!("{{\"id\":{i},\"score\":null}},")).collect();
        let changed = text.replacen("\"id\":700,\"score\":null", "\"id\":700,\"score\":61", 1);
        let (a, b) = (text.as_bytes(), changed.as_bytes());
        assert_eq!(create_within(a, b, budget(a, b)), Some(create(a, b)));
    }

    #[test]
    fn the_wrong_base_fails_its_checksum() {
        let source: String = (0..100).map(|i| format!("match {i} pending; ")).collect();
        let target = source.replacen("match 40 pending", "match 40 final!", 1);
        let d = create(source.as_bytes(), target.as_bytes());
        let other = source.replacen("match 3 pending", "match 3 FINAL!!", 1);
        assert_eq!(apply(other.as_bytes(), &d, 1 << 20), Err(DeltaError::BadChecksum));
    }

    #[test]
    fn bad_deltas_are_errors_never_panics() {
        let source = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let good = create(source, b"0123456789abcdefghijklmnopqrstuvwxyz!!");
        for cut in 0..good.len() {
            assert!(apply(source, &good[..cut], 1 << 20).is_err(), "cut at {cut}");
        }
        for bad in [
            &b""[..],
            b"\n",
            b"5",
            b"5\n",
            b"5\n5@0",
            b"5\n9@0,",
            b"5\n5@~~~~~~~~~~~~,",
            b"5\n5:ab",
            b"5\n~~~~~~~~~~~~~~:ab",
            b"~~~~~~~~~~~~\n0;",
            b"5\n5?",
            b"2\n2:ab0;",
            b"2\n1:a0;",
        ] {
            assert!(apply(source, bad, 1 << 20).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(apply(source, &good, 10), Err(DeltaError::TooLong));
        let mut rng = Rng(7);
        for _ in 0..2000 {
            let mut d = good.clone();
            let at = rng.below(d.len());
            d[at] = rng.next() as u8;
            let _ = apply(source, &d, 1 << 20);
        }
    }
}
