//! Fossil deltas (`courtside_core::delta`): a publisher controls both states the server makes a
//! delta of, so `create_within` must take any two byte strings, and what it makes applies back
//! to the target; `apply` (a client's side) takes any bytes as a delta and never panics.
#![no_main]
use courtside_core::delta::{apply, budget, create_within};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let at = (usize::from(split) * rest.len()) / 255;
    let (base, target) = rest.split_at(at.min(rest.len()));
    // As the server makes them: within the search budget, or none (the state goes whole).
    if let Some(delta) = create_within(base, target, budget(base, target)) {
        assert_eq!(apply(base, &delta, 1 << 20).as_deref(), Ok(target));
    }
    let _ = apply(base, target, 1 << 20);
});
