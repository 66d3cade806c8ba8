//! permessage-deflate (RFC 7692) as pure functions: the extension's negotiation, one message
//! compressed without context takeover (so one compressed payload serves every subscriber), and
//! a client's compressed message inflated under a hard limit (a decompression bomb stops there).
//! The codec is `flate2`'s raw DEFLATE (its pure-Rust miniz_oxide backend).

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The empty stored block a sync flush ends with: removed from every compressed message and put
/// back before inflating one (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The server's answer to the first acceptable offer in the client's `Sec-WebSocket-Extensions`
/// values, or `None` when none is acceptable (the connection then goes uncompressed).
///
/// The answer always holds `server_no_context_takeover` (each message is compressed on its own,
/// once for every subscriber) and `client_no_context_takeover` (each client message inflates on
/// its own, so a connection keeps no inflate window between messages); RFC 7692 §7.1.1 lets a
/// server add both unasked. An offer is declined when it names an unknown parameter, repeats
/// one, gives a bad value, or limits the server's window below 15 bits (the compressor always
/// uses a 32 KiB window). `client_max_window_bits` is accepted and not answered: the inflater
/// takes any window up to 15 bits.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Option<String> {
    header_values
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(answer_offer)
}

/// The answer to one offer (`permessage-deflate; param; param=value`), if acceptable.
fn answer_offer(offer: &str) -> Option<String> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut seen: [bool; 4] = [false; 4];
    let mut server_max_window_bits = false;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim()))),
            None => (param, None),
        };
        let index = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => match value.and_then(window_bits) {
                Some(15) => {
                    server_max_window_bits = true;
                    2
                }
                _ => return None,
            },
            "client_max_window_bits" => match value {
                None => 3,
                Some(value) => {
                    window_bits(value)?;
                    3
                }
            },
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
    }
    let mut answer = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
    if server_max_window_bits {
        answer.push_str("; server_max_window_bits=15");
    }
    Some(answer)
}

/// A parameter's value without the quotes of a quoted-string (RFC 7692 §7.1: the value must be
/// a token either way).
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// A window size in bits: 8 to 15, decimal, no leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    /// One compressor per thread, reset for every message: its state is some 300 KB, too much
    /// to allocate per publish.
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::default(), false));
}

/// Compresses one message as a permessage-deflate payload without context takeover: raw
/// DEFLATE (level 6), sync-flushed, the trailing `00 00 ff ff` removed. `None` only if the
/// codec fails (it does not on any input).
pub fn compress_message(message: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut compress = cell.borrow_mut();
        compress.reset();
        let mut out = Vec::with_capacity(message.len() / 2 + 64);
        loop {
            let consumed = usize::try_from(compress.total_in()).ok()?;
            compress
                .compress_vec(&message[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            let consumed = usize::try_from(compress.total_in()).ok()?;
            if consumed == message.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        Some(out)
    })
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than the limit (nothing past the limit was allocated).
    #[error("inflated message larger than {0} bytes")]
    TooBig(usize),
    /// It is not valid DEFLATE data.
    #[error("invalid compressed data")]
    Corrupt,
}

/// Inflates one compressed message, fed in pieces as its frames arrive, into at most `limit`
/// bytes: the output buffer grows with what the data inflates to and never past `limit + 1`
/// bytes, the point at which it stops with `TooBig`.
#[derive(Debug)]
pub struct MessageInflater {
    inflate: Decompress,
    out: Vec<u8>,
    limit: usize,
    /// The data held a final block: anything after it is ignored.
    ended: bool,
}

impl MessageInflater {
    pub fn new(limit: usize) -> Self {
        Self {
            inflate: Decompress::new(false),
            out: Vec::new(),
            limit,
            ended: false,
        }
    }

    /// Inflates the next piece of the message.
    pub fn push(&mut self, compressed: &[u8]) -> Result<(), InflateError> {
        let mut input = compressed;
        while !self.ended {
            if self.out.len() == self.out.capacity() {
                if self.out.len() > self.limit {
                    return Err(InflateError::TooBig(self.limit));
                }
                // Grow by doubling, from 4 KiB, up to one byte past the limit.
                let room = (self.limit.saturating_add(1) - self.out.len()).min(self.out.len().max(4096));
                self.out.reserve_exact(room);
            }
            let (in_before, out_before) = (self.inflate.total_in(), self.out.len());
            let status = self
                .inflate
                .decompress_vec(input, &mut self.out, FlushDecompress::None)
                .map_err(|_| InflateError::Corrupt)?;
            let used = usize::try_from(self.inflate.total_in() - in_before).map_err(|_| InflateError::Corrupt)?;
            input = &input[used..];
            if self.out.len() > self.limit {
                return Err(InflateError::TooBig(self.limit));
            }
            let room = self.out.len() < self.out.capacity();
            match status {
                Status::StreamEnd => self.ended = true,
                // Out of input with room left in the output: this piece is done.
                _ if input.is_empty() && room => break,
                // Input left, room left, and no progress: valid data never does that.
                _ if used == 0 && self.out.len() == out_before && room => return Err(InflateError::Corrupt),
                _ => {}
            }
        }
        Ok(())
    }

    /// The whole message, once its last frame was pushed.
    pub fn finish(mut self) -> Result<Vec<u8>, InflateError> {
        self.push(&TAIL)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_offers_are_answered_with_no_context_takeover_both_ways() {
        let answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        for offer in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits=10; server_no_context_takeover",
            "Permessage-Deflate; client_no_context_takeover",
            "permessage-deflate; client_max_window_bits=\"12\"",
        ] {
            assert_eq!(negotiate([offer]).as_deref(), Some(answer), "{offer}");
        }
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=15"]).as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15"
            )
        );
    }

    #[test]
    fn unacceptable_offers_are_declined_and_the_next_one_taken() {
        for offer in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=016",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; mystery",
        ] {
            assert_eq!(negotiate([offer]), None, "{offer}");
        }
        assert!(negotiate(["permessage-deflate; server_max_window_bits=9, permessage-deflate"]).is_some());
        assert!(negotiate(["foo", "permessage-deflate"]).is_some());
    }

    #[test]
    fn rfc_7692_hello_example() {
        // RFC 7692 §7.2.3.1: "Hello" compressed without context takeover.
        let hello = compress_message(b"Hello").expect("compress");
        let mut inflater = MessageInflater::new(100);
        inflater
            .push(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00])
            .expect("inflate");
        assert_eq!(inflater.finish().expect("finish"), b"Hello");
        let mut inflater = MessageInflater::new(100);
        inflater.push(&hello).expect("inflate");
        assert_eq!(inflater.finish().expect("finish"), b"Hello");
        // A final block (BFINAL set) is fine too: RFC 7692 §7.2.3.4's "Hello" in one.
        let mut inflater = MessageInflater::new(100);
        inflater
            .push(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00])
            .expect("inflate");
        assert_eq!(inflater.finish().expect("finish"), b"Hello");
    }

    #[test]
    fn compressed_messages_inflate_to_themselves_in_any_pieces() {
        let message: Vec<u8> = (0..50_000u32)
            .flat_map(|i| format!("{{\"m\":{},\"s\":[{}]}}", i % 97, i % 13).into_bytes())
            .collect();
        let compressed = compress_message(&message).expect("compress");
        assert!(compressed.len() < message.len() / 5, "{}", compressed.len());
        assert!(!compressed.ends_with(&TAIL));
        for piece in [1, 7, 4096, compressed.len()] {
            let mut inflater = MessageInflater::new(message.len());
            for chunk in compressed.chunks(piece) {
                inflater.push(chunk).expect("inflate");
            }
            assert_eq!(inflater.finish().expect("finish"), message, "pieces of {piece}");
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit_without_growing_past_it() {
        let message = vec![b'a'; 10 << 20];
        let bomb = compress_message(&message).expect("compress");
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        let mut inflater = MessageInflater::new(1 << 20);
        let error = inflater.push(&bomb).expect_err("too big");
        assert_eq!(error, InflateError::TooBig(1 << 20));
        assert!(inflater.out.capacity() <= (1 << 20) + 1, "{}", inflater.out.capacity());
        // Exactly at the limit is accepted.
        let mut inflater = MessageInflater::new(1 << 20);
        inflater
            .push(&compress_message(&message[..1 << 20]).expect("compress"))
            .expect("fits");
        assert_eq!(inflater.finish().expect("finish").len(), 1 << 20);
    }

    #[test]
    fn garbage_is_corrupt() {
        let mut inflater = MessageInflater::new(1000);
        let result = match inflater.push(&[0xff; 16]) {
            Ok(()) => inflater.finish().map(drop),
            Err(error) => Err(error),
        };
        assert_eq!(result, Err(InflateError::Corrupt));
    }
}
