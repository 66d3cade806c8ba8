//! A message off a Redis channel (another node's, or anything else that publishes there):
//! decoded to an envelope or a typed error, never a panic.
#![no_main]
use courtside_codecs::envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envelope::decode(data);
});
