//! A WebTransport message from a client (control stream or datagram): decoded or refused with a
//! typed error; what decodes encodes back to a message that decodes to the same thing.
#![no_main]
use courtside_core::wire::{decode_client, encode_client};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode_client(data) {
        let again = encode_client(&message);
        let decoded = decode_client(&again).expect("a re-encoded message decodes");
        assert_eq!(format!("{decoded:?}"), format!("{message:?}"));
    }
});
