//! The check lives in `metald::fuzzing` so `make test` replays this target's corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| metald::fuzzing::qmp_reader(data));
