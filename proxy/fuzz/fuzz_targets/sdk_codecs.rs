//! The SDK's table and health codecs, both directions (decode, then encode gives the same bytes).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_core::fuzzing::sdk_codecs(data));
