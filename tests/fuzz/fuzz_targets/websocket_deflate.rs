//! permessage-deflate from a client: its `Sec-WebSocket-Extensions` offer, and its frames read
//! through the inflating filter in pieces of any size (the first byte picks the size), under a
//! 64 KiB message limit. Answered, passed on or refused, never a panic, and nothing inflated
//! past the limit.
#![no_main]
use std::collections::VecDeque;

use courtside_codecs::websocket_inflate::CompressedFrames;
use courtside_core::deflate::negotiate;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 65536;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = negotiate([text]);
    }
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let mut frames = CompressedFrames::new(LIMIT);
    let mut out = VecDeque::new();
    for piece in bytes.chunks(usize::from(split).max(1)) {
        if frames.feed(piece, &mut out).is_err() {
            break;
        }
    }
    for chunk in &out {
        assert!(chunk.len() <= LIMIT.max(bytes.len()), "{}", chunk.len());
    }
});
