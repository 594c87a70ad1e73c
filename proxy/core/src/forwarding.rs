//! Forwarding headers: what the backend is told about the client and the hop
//! (`X-Forwarded-For`, `-Proto`, `-Host`, RFC 7239 `Forwarded`, `Via`, a request id), and which
//! address counts as the client's.
//!
//! The trust rule: incoming forwarding headers are believed only from a peer inside
//! `trusted_proxies` (empty by default). From anyone else they are dropped and replaced, so a
//! client cannot claim another address. The client address strategies see follows the same rule:
//! the peer, or, behind trusted proxies, the right-most `X-Forwarded-For` entry that is not itself
//! a trusted proxy.
//!
//! The decisions are made here once for both request paths. The lean path writes the headers as
//! bytes into the head it forwards, and pingora's path inserts them into its request header;
//! [`HeaderSink`] is that difference.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

/// `[server.forwarding]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardingConfig {
    /// Add `X-Forwarded-For`, `-Proto` and `-Host`.
    #[serde(default = "yes")]
    pub x_forwarded: bool,
    /// Peers (CIDRs or addresses) whose forwarding headers are kept and extended.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Add an RFC 7239 `Forwarded` header.
    #[serde(default)]
    pub forwarded: bool,
    /// Add this hop to `Via`.
    #[serde(default = "yes")]
    pub via: bool,
    /// The request id header: passed through when present, generated when absent; "" turns it off.
    #[serde(default = "default_request_id")]
    pub request_id_header: String,
}

fn yes() -> bool {
    true
}

fn default_request_id() -> String {
    "x-request-id".into()
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        ForwardingConfig {
            x_forwarded: true,
            trusted_proxies: Vec::new(),
            forwarded: false,
            via: true,
            request_id_header: default_request_id(),
        }
    }
}

impl ForwardingConfig {
    /// The rules, or which entry is wrong.
    pub fn build(&self) -> Result<Forwarding, String> {
        let mut trusted = Vec::with_capacity(self.trusted_proxies.len());
        for t in &self.trusted_proxies {
            let net = t
                .parse::<IpNet>()
                .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!("[server.forwarding] trusted_proxies: \"{t}\" is not an address or a CIDR such as \"10.0.0.0/8\"")
                })?;
            trusted.push(net);
        }
        let id = self.request_id_header.to_ascii_lowercase();
        if !id.is_empty() && http::header::HeaderName::from_bytes(id.as_bytes()).is_err() {
            return Err(format!(
                "[server.forwarding] request_id_header \"{}\" is not a valid header name",
                self.request_id_header
            ));
        }
        Ok(Forwarding {
            x_forwarded: self.x_forwarded,
            trusted,
            forwarded: self.forwarded,
            via: self.via,
            request_id: (!id.is_empty()).then_some(id),
        })
    }
}

/// The forwarding rules in force.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    x_forwarded: bool,
    trusted: Vec<IpNet>,
    forwarded: bool,
    via: bool,
    request_id: Option<String>,
}

/// What is known about one hop: the peer, the scheme it came in on, and the request's host.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The connection's peer address.
    pub peer: Option<IpAddr>,
    /// The peer is a trusted proxy (see [`Forwarding::trusts`]); computed once per connection.
    pub trusted: bool,
    /// `https` on a TLS listener, else `http`.
    pub scheme: &'a str,
    /// The request's host (authority), if any.
    pub host: Option<&'a [u8]>,
}

/// Where forwarding headers go: the lean path's head buffer or pingora's request header.
pub trait HeaderSink {
    /// Adds header `name` with the concatenation of `parts` as its value.
    fn header(&mut self, name: &str, parts: &[&[u8]]);
}

/// The incoming headers the rules read, in their request's order.
pub trait IncomingHeaders {
    /// Calls `each` with every value of header `name` (case-insensitive).
    fn each_value<'s>(&'s self, name: &[u8], each: &mut dyn FnMut(&'s [u8]));
    /// Whether header `name` is present.
    fn has(&self, name: &[u8]) -> bool {
        let mut found = false;
        self.each_value(name, &mut |_| found = true);
        found
    }
}

impl IncomingHeaders for http::HeaderMap {
    fn each_value<'s>(&'s self, name: &[u8], each: &mut dyn FnMut(&'s [u8])) {
        if let Ok(name) = http::header::HeaderName::from_bytes(name) {
            for v in self.get_all(name) {
                each(v.as_bytes());
            }
        }
    }
}

/// The forwarding headers this module writes; incoming copies are not forwarded as they are.
const REWRITTEN: [&[u8]; 5] = [
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"via",
];

impl Forwarding {
    /// The request id header's name (lower case), when ids are on.
    pub fn request_id_name(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: Option<IpAddr>) -> bool {
        ip.is_some_and(|ip| self.trusted.iter().any(|n| n.contains(&ip)))
    }

    /// True for a header the rules rewrite (the caller drops the incoming copy and calls
    /// [`Forwarding::write`]). Only when the feature that owns it is on.
    pub fn rewrites(&self, name: &[u8]) -> bool {
        let n = |i: usize| name.eq_ignore_ascii_case(REWRITTEN[i]);
        (self.x_forwarded && (n(0) || n(1) || n(2)))
            || (self.forwarded && n(3))
            || (self.via && n(4))
    }

    /// The client address as strategies see it: the peer, or behind trusted proxies the
    /// right-most `X-Forwarded-For` address that is not a trusted proxy (the left-most if all are).
    pub fn client_ip(&self, hop: &Hop<'_>, incoming: &dyn IncomingHeaders) -> Option<IpAddr> {
        if !hop.trusted {
            return hop.peer;
        }
        let mut chain_client = None;
        let mut done = false;
        let mut last_seen = None;
        // Entries are read left to right; the answer is the last untrusted one.
        incoming.each_value(b"x-forwarded-for", &mut |v| {
            for entry in v.split(|&c| c == b',') {
                let Some(ip) = std::str::from_utf8(entry.trim_ascii())
                    .ok()
                    .and_then(|s| s.parse::<IpAddr>().ok())
                else {
                    continue;
                };
                last_seen.get_or_insert(ip);
                if !self.trusts(Some(ip)) {
                    chain_client = Some(ip);
                    done = true;
                }
            }
        });
        if done {
            chain_client
        } else {
            last_seen.or(hop.peer)
        }
    }

    /// Writes the forwarding headers for a request: the trusted incoming values extended with
    /// this hop, or this hop's alone. `request_id` is the id to add when the request has none
    /// (see [`Forwarding::needs_request_id`]).
    pub fn write(
        &self,
        hop: &Hop<'_>,
        incoming: &dyn IncomingHeaders,
        request_id: Option<&[u8]>,
        sink: &mut dyn HeaderSink,
    ) {
        let mut ip_buf = [0u8; 64];
        let peer: &[u8] = match hop.peer {
            Some(ip) => write_ip(&mut ip_buf, ip),
            None => b"unknown",
        };
        let host = hop.host.unwrap_or(b"");
        if self.x_forwarded {
            self.extended(
                hop,
                incoming,
                b"x-forwarded-for",
                peer,
                "X-Forwarded-For",
                sink,
            );
            self.kept_or_set(
                hop,
                incoming,
                b"x-forwarded-proto",
                hop.scheme.as_bytes(),
                "X-Forwarded-Proto",
                sink,
            );
            if hop.host.is_some() {
                self.kept_or_set(
                    hop,
                    incoming,
                    b"x-forwarded-host",
                    host,
                    "X-Forwarded-Host",
                    sink,
                );
            }
        }
        if self.forwarded {
            let ipv6 = matches!(hop.peer, Some(IpAddr::V6(_)));
            let (q1, q2): (&[u8], &[u8]) = if ipv6 { (b"\"[", b"]\"") } else { (b"", b"") };
            let mut parts: [&[u8]; 9] = [
                b"",
                b"for=",
                q1,
                peer,
                q2,
                b";proto=",
                hop.scheme.as_bytes(),
                b"",
                b"",
            ];
            if hop.host.is_some() {
                parts[7] = b";host=";
                parts[8] = host;
            }
            self.with_incoming(hop, incoming, b"forwarded", &mut parts, "Forwarded", sink);
        }
        if self.via {
            // Via is extended whoever sent it: it records hops, not identities.
            let mut all = ViaChain::default();
            incoming.each_value(b"via", &mut |v| all.push(v));
            all.finish(sink);
        }
        if let (Some(name), Some(id)) = (&self.request_id, request_id) {
            sink.header(name, &[id]);
        }
    }

    /// Whether a request id must be generated for a request with these headers.
    pub fn needs_request_id(&self, incoming: &dyn IncomingHeaders) -> bool {
        self.request_id
            .as_ref()
            .is_some_and(|n| !incoming.has(n.as_bytes()))
    }

    /// `name: <incoming values, if trusted>, <own>`.
    fn extended(
        &self,
        hop: &Hop<'_>,
        incoming: &dyn IncomingHeaders,
        name: &[u8],
        own: &[u8],
        display: &str,
        sink: &mut dyn HeaderSink,
    ) {
        let mut parts: [&[u8]; 1] = [own];
        self.with_incoming(hop, incoming, name, &mut parts, display, sink);
    }

    /// `name: <incoming values, if trusted>, <parts...>`, written as one header.
    fn with_incoming(
        &self,
        hop: &Hop<'_>,
        incoming: &dyn IncomingHeaders,
        name: &[u8],
        parts: &mut [&[u8]],
        display: &str,
        sink: &mut dyn HeaderSink,
    ) {
        if hop.trusted && incoming.has(name) {
            let mut chain = Chain::default();
            incoming.each_value(name, &mut |v| chain.push(v));
            chain.finish(display, parts, sink);
        } else {
            sink.header(display, parts);
        }
    }

    /// The trusted incoming value, or `own`.
    fn kept_or_set(
        &self,
        hop: &Hop<'_>,
        incoming: &dyn IncomingHeaders,
        name: &[u8],
        own: &[u8],
        display: &str,
        sink: &mut dyn HeaderSink,
    ) {
        let mut kept = false;
        if hop.trusted {
            incoming.each_value(name, &mut |v| {
                if !kept {
                    sink.header(display, &[v]);
                    kept = true;
                }
            });
        }
        if !kept {
            sink.header(display, &[own]);
        }
    }
}

/// Incoming values of one header joined with ", ", held as slices (at most 8 lines; more are
/// joined into the last by the sink's own buffer when that is exceeded, which no real chain is).
#[derive(Default)]
struct Chain<'v> {
    values: [&'v [u8]; 8],
    n: usize,
}

impl<'v> Chain<'v> {
    fn push(&mut self, v: &'v [u8]) {
        if self.n < self.values.len() {
            self.values[self.n] = v;
            self.n += 1;
        }
    }

    fn finish(&self, display: &str, own: &[&[u8]], sink: &mut dyn HeaderSink) {
        // values joined by ", ", then ", ", then own parts: at most 8*2 + 9 slices.
        let mut parts: [&[u8]; 32] = [b""; 32];
        let mut k = 0;
        for (i, v) in self.values[..self.n].iter().enumerate() {
            if i > 0 {
                parts[k] = b", ";
                k += 1;
            }
            parts[k] = v;
            k += 1;
        }
        parts[k] = b", ";
        k += 1;
        for p in own {
            parts[k] = p;
            k += 1;
        }
        sink.header(display, &parts[..k]);
    }
}

/// `Via`: the incoming chain, then this hop.
#[derive(Default)]
struct ViaChain<'v>(Chain<'v>);

impl<'v> ViaChain<'v> {
    fn push(&mut self, v: &'v [u8]) {
        self.0.push(v);
    }

    fn finish(&self, sink: &mut dyn HeaderSink) {
        const ME: &[u8] = b"1.1 sluice";
        if self.0.n == 0 {
            sink.header("Via", &[ME]);
        } else {
            self.0.finish("Via", &[ME], sink);
        }
    }
}

/// `ip` as text in `buf`, without allocating.
fn write_ip(buf: &mut [u8; 64], ip: IpAddr) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // An address is at most 45 bytes: the write cannot fail.
    let _ = write!(cursor, "{ip}");
    let n = cursor.position() as usize;
    &buf[..n]
}

/// A new request id: 128 random bits as 32 lower-case hex digits.
pub fn new_request_id(out: &mut [u8; 32]) {
    // rand's thread-local generator: no lock, no allocation.
    let v: u128 = rand::random();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().enumerate() {
        *o = HEX[((v >> (124 - 4 * i)) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers as (name, value) pairs.
    struct Given(Vec<(&'static str, &'static str)>);

    impl IncomingHeaders for Given {
        fn each_value<'s>(&'s self, name: &[u8], each: &mut dyn FnMut(&'s [u8])) {
            for (n, v) in &self.0 {
                if n.as_bytes().eq_ignore_ascii_case(name) {
                    each(v.as_bytes());
                }
            }
        }
    }

    #[derive(Default)]
    struct Out(Vec<(String, String)>);

    impl HeaderSink for Out {
        fn header(&mut self, name: &str, parts: &[&[u8]]) {
            let v: Vec<u8> = parts.concat();
            self.0
                .push((name.to_string(), String::from_utf8(v).unwrap()));
        }
    }

    fn rules(trusted: &[&str], forwarded: bool) -> Forwarding {
        ForwardingConfig {
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            forwarded,
            ..ForwardingConfig::default()
        }
        .build()
        .unwrap()
    }

    fn run(f: &Forwarding, peer: &str, incoming: Given) -> (Vec<(String, String)>, Option<IpAddr>) {
        let peer: IpAddr = peer.parse().unwrap();
        let hop = Hop {
            peer: Some(peer),
            trusted: f.trusts(Some(peer)),
            scheme: "https",
            host: Some(b"shop.example"),
        };
        let mut out = Out::default();
        f.write(&hop, &incoming, Some(b"0123"), &mut out);
        (out.0, f.client_ip(&hop, &incoming))
    }

    fn get<'a>(h: &'a [(String, String)], n: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str())
    }

    #[test]
    fn an_untrusted_peer_cannot_claim_another_address() {
        let f = rules(&[], true);
        let (h, client) = run(
            &f,
            "203.0.113.7",
            Given(vec![
                ("X-Forwarded-For", "1.2.3.4"),
                ("X-Forwarded-Proto", "http"),
                ("Forwarded", "for=1.2.3.4"),
                ("Via", "1.0 fred"),
            ]),
        );
        assert_eq!(get(&h, "X-Forwarded-For"), Some("203.0.113.7"));
        assert_eq!(get(&h, "X-Forwarded-Proto"), Some("https"));
        assert_eq!(get(&h, "X-Forwarded-Host"), Some("shop.example"));
        assert_eq!(
            get(&h, "Forwarded"),
            Some("for=203.0.113.7;proto=https;host=shop.example")
        );
        assert_eq!(get(&h, "Via"), Some("1.0 fred, 1.1 sluice"));
        assert_eq!(get(&h, "x-request-id"), Some("0123"));
        assert_eq!(client, Some("203.0.113.7".parse().unwrap()));
    }

    #[test]
    fn behind_trusted_proxies_the_chain_is_extended_and_the_client_found() {
        let f = rules(&["10.0.0.0/8", "192.0.2.1"], false);
        let (h, client) = run(
            &f,
            "10.1.1.1",
            Given(vec![
                ("X-Forwarded-For", "198.51.100.9, 192.0.2.1"),
                ("X-Forwarded-Proto", "http"),
            ]),
        );
        assert_eq!(
            get(&h, "X-Forwarded-For"),
            Some("198.51.100.9, 192.0.2.1, 10.1.1.1")
        );
        assert_eq!(
            get(&h, "X-Forwarded-Proto"),
            Some("http"),
            "kept from a trusted proxy"
        );
        assert_eq!(client, Some("198.51.100.9".parse().unwrap()));
        // Spoofed entries left of the real client do not count: the right-most untrusted wins.
        let (_, client) = run(
            &f,
            "10.1.1.1",
            Given(vec![("X-Forwarded-For", "6.6.6.6, 198.51.100.9")]),
        );
        assert_eq!(client, Some("198.51.100.9".parse().unwrap()));
        let ipv6 = rules(&[], true);
        let (h, _) = run(&ipv6, "2001:db8::1", Given(vec![]));
        assert_eq!(
            get(&h, "Forwarded"),
            Some("for=\"[2001:db8::1]\";proto=https;host=shop.example")
        );
    }

    #[test]
    fn bad_entries_are_named_and_ids_are_hex() {
        let bad = ForwardingConfig {
            trusted_proxies: vec!["10.0.0.0/33".into()],
            ..ForwardingConfig::default()
        };
        assert!(bad.build().unwrap_err().contains("\"10.0.0.0/33\""));
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        new_request_id(&mut a);
        new_request_id(&mut b);
        assert_ne!(a, b);
        assert!(a.iter().all(|c| c.is_ascii_hexdigit()));
    }
}
