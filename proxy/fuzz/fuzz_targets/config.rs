//! Config parsing and validation: any text gives a config or an error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_core::fuzzing::config(data));
