//! Plugin loading from arbitrary bytes: refused with a reason, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_core::fuzzing::plugin_load(data));
