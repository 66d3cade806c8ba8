//! A WebSocket text frame from a client: parsed to a command or a typed error, never a panic; an
//! error answer is valid JSON.
#![no_main]
use courtside_core::parse_command;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // a text frame is UTF-8 (tungstenite refuses others before us)
    };
    if let Err(error) = parse_command(text) {
        let answer = error.to_control().to_json();
        assert!(serde_json::from_str::<serde_json::Value>(&answer).is_ok(), "{answer}");
    }
});
