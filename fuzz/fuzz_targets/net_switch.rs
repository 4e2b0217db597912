#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::net_switch(data));
