//! The HTTP/1 head parser and chunked decoder of the prober, client and demo backends.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_core::fuzzing::http1(data));
