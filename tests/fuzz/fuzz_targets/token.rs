//! A token a client presents (`auth`, `Authorization: Bearer`): verified or refused with a typed
//! error, never a panic, whatever its header, claims or signature.
#![no_main]
use std::sync::OnceLock;

use courtside_codecs::tokens::{TokenSettings, TokenVerifier};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static TokenVerifier {
    static VERIFIER: OnceLock<TokenVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        TokenVerifier::new(TokenSettings {
            secret: Some("fuzz-secret".into()),
            issuer: Some("platform".into()),
            audience: Some("courtside".into()),
            ..TokenSettings::default()
        })
        .expect("verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = verifier().verify(token);
    }
});
