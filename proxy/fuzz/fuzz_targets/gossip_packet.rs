//! Gossip datagrams and frames: open (authenticate, decrypt) and decode.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_core::fuzzing::gossip_packet(data));
