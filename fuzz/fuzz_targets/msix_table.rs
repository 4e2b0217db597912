#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::msix_table(data));
