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

/// Where forwarding headers go: the lean path's head buffer or pingora's request header. A
/// header is written as `start`, any number of `push`es making up its value, then `end`, so a
/// chain of any length is written without collecting it first.
pub trait HeaderSink {
    /// Starts header `name`.
    fn start(&mut self, name: &str);
    /// Appends `part` to the value of the header being written.
    fn push(&mut self, part: &[u8]);
    /// Ends the header being written.
    fn end(&mut self);
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
        // Incoming values count only from a trusted proxy.
        let trusted = |name: &'static [u8]| hop.trusted.then_some((incoming, name));
        if self.x_forwarded {
            joined(
                sink,
                "X-Forwarded-For",
                trusted(b"x-forwarded-for"),
                &[peer],
            );
            let proto = first_of(trusted(b"x-forwarded-proto")).unwrap_or(hop.scheme.as_bytes());
            joined(sink, "X-Forwarded-Proto", None, &[proto]);
            if hop.host.is_some() {
                let fwd_host = first_of(trusted(b"x-forwarded-host")).unwrap_or(host);
                joined(sink, "X-Forwarded-Host", None, &[fwd_host]);
            }
        }
        if self.forwarded {
            let ipv6 = matches!(hop.peer, Some(IpAddr::V6(_)));
            let (q1, q2): (&[u8], &[u8]) = if ipv6 { (b"\"[", b"]\"") } else { (b"", b"") };
            let (host_key, host_value): (&[u8], &[u8]) = match hop.host {
                Some(h) => (b";host=", h),
                None => (b"", b""),
            };
            let own = [
                b"for=".as_slice(),
                q1,
                peer,
                q2,
                b";proto=",
                hop.scheme.as_bytes(),
                host_key,
                host_value,
            ];
            joined(sink, "Forwarded", trusted(b"forwarded"), &own);
        }
        if self.via {
            // Via is extended whoever sent it: it records hops, not identities.
            joined(sink, "Via", Some((incoming, b"via")), &[b"1.1 sluice"]);
        }
        if let (Some(name), Some(id)) = (&self.request_id, request_id) {
            joined(sink, name, None, &[id]);
        }
    }

    /// Whether a request id must be generated for a request with these headers.
    pub fn needs_request_id(&self, incoming: &dyn IncomingHeaders) -> bool {
        self.request_id
            .as_ref()
            .is_some_and(|n| !incoming.has(n.as_bytes()))
    }
}

/// Writes `display: <every value of the incoming header, if given>, <own parts>`: a chain of
/// any length, streamed into the sink.
fn joined(
    sink: &mut dyn HeaderSink,
    display: &str,
    incoming: Option<(&dyn IncomingHeaders, &[u8])>,
    own: &[&[u8]],
) {
    sink.start(display);
    let mut any = false;
    if let Some((headers, name)) = incoming {
        headers.each_value(name, &mut |v| {
            if any {
                sink.push(b", ");
            }
            sink.push(v);
            any = true;
        });
    }
    if any {
        sink.push(b", ");
    }
    for p in own {
        sink.push(p);
    }
    sink.end();
}

/// The first value of the incoming header, if given and present.
fn first_of<'s>(incoming: Option<(&'s dyn IncomingHeaders, &[u8])>) -> Option<&'s [u8]> {
    let (headers, name) = incoming?;
    let mut first = None;
    headers.each_value(name, &mut |v| {
        first.get_or_insert(v);
    });
    first
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

/// A request id, held inline (no allocation): one sluice generated, or a client's that fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId {
    bytes: [u8; 32],
    len: u8,
}

impl RequestId {
    /// A new id: 128 random bits as 32 lower-case hex digits.
    pub fn generate() -> RequestId {
        // rand's thread-local generator: no lock, no allocation.
        let v: u128 = rand::random();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut bytes = [0u8; 32];
        for (i, o) in bytes.iter_mut().enumerate() {
            *o = HEX[((v >> (124 - 4 * i)) & 0xf) as usize];
        }
        RequestId { bytes, len: 32 }
    }

    /// A copy of `id` when it is at most 32 bytes long.
    pub fn copy_of(id: &[u8]) -> Option<RequestId> {
        let mut bytes = [0u8; 32];
        bytes.get_mut(..id.len())?.copy_from_slice(id);
        Some(RequestId {
            bytes,
            len: id.len() as u8,
        })
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
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
        fn start(&mut self, name: &str) {
            self.0.push((name.to_string(), String::new()));
        }
        fn push(&mut self, part: &[u8]) {
            let last = self.0.last_mut().unwrap();
            last.1.push_str(std::str::from_utf8(part).unwrap());
        }
        fn end(&mut self) {}
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

    /// A trusted chain is kept whole however many header lines carry it.
    #[test]
    fn a_long_trusted_chain_is_kept_whole() {
        let f = rules(&["10.0.0.0/8"], false);
        let lines: Vec<(&'static str, &'static str)> = [
            "1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4", "1.1.1.5", "1.1.1.6", "1.1.1.7", "1.1.1.8",
            "1.1.1.9", "1.1.1.10",
        ]
        .iter()
        .map(|ip| ("X-Forwarded-For", *ip))
        .collect();
        let (h, client) = run(&f, "10.0.0.1", Given(lines));
        assert_eq!(
            get(&h, "X-Forwarded-For"),
            Some("1.1.1.1, 1.1.1.2, 1.1.1.3, 1.1.1.4, 1.1.1.5, 1.1.1.6, 1.1.1.7, 1.1.1.8, 1.1.1.9, 1.1.1.10, 10.0.0.1")
        );
        assert_eq!(client, Some("1.1.1.10".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_named_and_ids_are_hex() {
        let bad = ForwardingConfig {
            trusted_proxies: vec!["10.0.0.0/33".into()],
            ..ForwardingConfig::default()
        };
        assert!(bad.build().unwrap_err().contains("\"10.0.0.0/33\""));
        let (a, b) = (RequestId::generate(), RequestId::generate());
        assert_ne!(a, b);
        assert_eq!(a.as_bytes().len(), 32);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(RequestId::copy_of(b"mine-1").unwrap().as_bytes(), b"mine-1");
        assert!(RequestId::copy_of(&[b'x'; 33]).is_none());
    }
}
