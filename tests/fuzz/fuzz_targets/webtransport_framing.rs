//! A WebTransport stream's bytes, split into length-prefixed frames: whatever the bytes and however
//! they arrive in pieces, the decoder gives frames no larger than the limit or an error.
#![no_main]
use courtside_core::wire::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let max = 1 << (usize::from(split) % 20);
    let mut decoder = FrameDecoder::default();
    for piece in rest.chunks(usize::from(split).max(1)) {
        decoder.extend(piece);
        loop {
            let ready = decoder.has_frame(max);
            match decoder.next_frame(max) {
                Ok(Some(frame)) => {
                    assert!(ready && frame.len() <= max);
                }
                Ok(None) => {
                    assert!(!ready);
                    break;
                }
                Err(_) => return,
            }
        }
    }
});
