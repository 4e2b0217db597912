#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::sriov_topology(data));
