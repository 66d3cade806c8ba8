//! What a WebTransport client sends before its session: the HTTP/3 CONNECT stream, a stream's
//! session header, a datagram's prefix, its unidirectional streams' types and its SETTINGS.
//! Parsed or refused, never a panic.
#![no_main]
use courtside_codecs::h3;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = h3::read_connect(data);
    let _ = h3::read_connect_stream(data);
    let _ = h3::read_stream_session(data);
    let prefix = h3::datagram_prefix(0);
    let _ = h3::datagram_payload(data, &prefix);
    let _ = h3::read_uni_stream_type(data);
    let _ = h3::read_client_settings(data);
});
