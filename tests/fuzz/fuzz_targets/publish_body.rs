//! A publish API body: a single publish's JSON, or a `POST /v1/publish` batch checked item by
//! item, with and without a publish scope. Accepted or refused with a documented error.
#![no_main]
use courtside_codecs::publish::{check_batch, PublishScope};
use courtside_codecs::tokens::RoomPattern;
use courtside_core::JsonData;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = JsonData::parse(data);
    let _ = check_batch(data, 100, None);
    let scope = PublishScope::Rooms(vec![RoomPattern::new("game:*")]);
    if let Ok(items) = check_batch(data, 100, Some(&scope)) {
        assert!(items.iter().all(|item| item.room.as_str().starts_with("game:")));
    }
});
