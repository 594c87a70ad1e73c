//! Fuzz target bodies, one function per target of `proxy/fuzz` (cargo-fuzz, nightly). They live
//! here, in the stable build, so that `tests/fuzz_corpus.rs` runs every kept corpus input and every
//! crash found so far through exactly the code the fuzzer ran. Each must never panic; where a
//! decoder has an encoder, what decodes must encode back to the same bytes.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::config::Config;
use crate::http1::{self, ChunkedDecoder};
use crate::plugin::{PluginEngine, PluginKind};

/// Config text (any bytes; non-UTF-8 is refused like a file would be).
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, "fuzz.toml", Path::new("/nonexistent"));
    }
}

/// HTTP/1 heads and chunked bodies. The first byte splits the rest into pieces, so the decoder
/// also sees its input cut at every place.
pub fn http1(data: &[u8]) {
    let _ = http1::parse_request(data);
    let _ = http1::parse_response(data, false);
    // The proxy's in-place parser: whatever it accepts must have a consistent head and body.
    let mut spans = Vec::new();
    if let Ok(Some(h)) = crate::head::parse_request(data, &mut spans, http1::MAX_HEAD) {
        assert!(h.len <= data.len());
        for s in &spans {
            let _ = (s.name.of(data), s.value.of(data));
        }
        let mut body = crate::head::BodyCursor::new(h.framing);
        let used = body.advance(&data[h.len..]).unwrap_or(0);
        assert!(used <= data.len() - h.len);
    }
    if let Ok(Some(r)) = crate::head::parse_response(data, &mut spans, false, http1::MAX_HEAD) {
        assert!(r.len <= data.len());
        let _ = r.reason.of(data);
    }
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut decoder = ChunkedDecoder::new();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < body.len() && !decoder.is_done() {
        let end = (pos + step).min(body.len());
        match decoder.decode(&body[pos..end], &mut out) {
            Ok(used) => {
                assert!(used <= end - pos, "decoder used more than it was given");
                if used < end - pos {
                    assert!(decoder.is_done(), "decoder stopped early without finishing");
                }
                pos += used;
            }
            Err(_) => return,
        }
    }
}

/// A gossip datagram or frame as received: opened with a fixed keyring (forged or random input
/// must be refused), and the plaintext decoder on its own.
pub fn gossip_packet(data: &[u8]) {
    use sluice_gossip::keyring::Keyring;
    use sluice_gossip::wire;
    static RING: OnceLock<Keyring> = OnceLock::new();
    let ring = RING.get_or_init(|| {
        Keyring::from_base64(&["c2x1aWNlLWZ1enota2V5LTMyLWJ5dGVzLWxvbmchISE="])
            .expect("a valid fixed key")
    });
    let _ = wire::open(ring, "fuzz", data, |_| true);
    let _ = wire::decode_plain(data);
    // What is sealed opens to the same message, stamp included.
    if let Some((&kind, body)) = data.split_first() {
        let kind = match kind % 3 {
            0 => wire::Kind::Foca,
            1 => wire::Kind::PushPull,
            _ => wire::Kind::PushPullReply,
        };
        let stamp = wire::Stamp {
            session: body.len() as u64,
            counter: u64::from(kind as u8),
            sent_at_s: 1_800_000_000,
        };
        let sealed = wire::seal(ring, "fuzz", kind, stamp, body, kind != wire::Kind::Foca);
        let opened = wire::open(ring, "fuzz", &sealed, |s| *s == stamp);
        if body.len() > kind.max_body() {
            // Larger than its kind may carry: refused, whether deflated or not.
            assert_eq!(
                opened,
                Err(wire::OpenError::Wire(wire::WireError::TooLarge))
            );
            return;
        }
        let m = opened.expect("own seal opens");
        assert!(
            m.kind == kind && m.body == body && m.stamp == stamp,
            "seal/open round trip changed the message"
        );
    }
}

/// The SDK's table and health codecs: whatever decodes encodes, and decodes back to the same
/// value (bytes may differ only where the format ignores them, such as reserved flag bits).
pub fn sdk_codecs(data: &[u8]) {
    use sluice_sdk::{Backend, Backends, Probe, ProbeResult};
    if let Ok(t) = Backends::decode(data) {
        let again = Backends::decode(&t.encode().expect("a decoded table encodes"));
        assert_eq!(again.as_ref(), Ok(&t));
    }
    if let Ok(b) = Backend::decode(data) {
        let again = Backend::decode(&b.encode().expect("a decoded entry encodes"));
        assert_eq!(again.as_ref(), Ok(&b));
    }
    if let Ok(p) = Probe::decode(data) {
        let again = Probe::decode(&p.encode().expect("a decoded probe encodes"));
        assert_eq!(again.as_ref(), Ok(&p));
    }
    if let Ok(r) = ProbeResult::decode(data) {
        let again = ProbeResult::decode(&r.encode().expect("a decoded result encodes"));
        assert_eq!(again.as_ref(), Ok(&r));
    }
}

/// Plugin bytes: compiled and checked as an upload would be; refused with a reason or loaded.
pub fn plugin_load(data: &[u8]) {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| PluginEngine::new().expect("the engine starts"));
    let _ = engine.compile(data, PluginKind::Strategy, "fuzz", 1, Arc::from(&b"{}"[..]));
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_gossip_body_larger_than_its_kind_allows_is_refused_not_a_crash() {
        // A foca packet (first byte 0) of 10 000 bytes cannot fit any datagram.
        let mut data = vec![0u8; 10_000];
        super::gossip_packet(&data);
        data[0] = 1; // a push-pull of the same size is fine
        super::gossip_packet(&data);
    }
}
