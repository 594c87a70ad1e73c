//! The backend table: what the host pushes on every membership, weight or health change.

use crate::host;
use std::fmt;

/// Flag bit 0 of a table entry: the backend is in the proxy's own zone.
const FLAG_LOCAL_ZONE: u32 = 1;

/// Smallest encoded entry: weight, flags and three empty `u16` lengths. Used to reject a bogus
/// `count` before allocating for it.
const MIN_ENTRY_LEN: usize = 4 + 4 + 2 + 2 + 2;

/// One backend of the table, as the host sees it right now.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    addr: String,
    weight: u32,
    in_local_zone: bool,
    zone: String,
    tags: Vec<String>,
}

impl Backend {
    /// A backend at `addr` with weight 1, no zone and no tags. With the `with_*` methods this is
    /// how tests build tables; in a plugin the host provides them.
    pub fn new(addr: impl Into<String>) -> Self {
        Backend {
            addr: addr.into(),
            weight: 1,
            in_local_zone: false,
            zone: String::new(),
            tags: Vec::new(),
        }
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the zone name.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    /// Marks the backend as being (or not) in the proxy's zone.
    pub fn with_local_zone(mut self, local: bool) -> Self {
        self.in_local_zone = local;
        self
    }

    /// Adds a tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// The address, e.g. `"127.0.0.1:9001"` or `"[::1]:9001"`: a stable identity, so it is the
    /// thing to hash for consistent or rendezvous hashing.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The effective weight: configured weight times the host's health factor. It may be lower
    /// than configured while the backend recovers.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// `true` if the backend is in the same zone as this proxy.
    pub fn in_local_zone(&self) -> bool {
        self.in_local_zone
    }

    /// The backend's zone, `None` if it has none.
    pub fn zone(&self) -> Option<&str> {
        if self.zone.is_empty() {
            None
        } else {
            Some(&self.zone)
        }
    }

    /// The operator-assigned tags.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// `true` if the backend carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// Decodes one entry of the backend table, without the table's leading count: what
    /// `sluice_health_probe` receives. Strict like [`Backends::decode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TableError> {
        let mut r = Reader { bytes, pos: 0 };
        let backend = read_entry(&mut r)?;
        if r.remaining() != 0 {
            return Err(r.error("trailing bytes after the backend"));
        }
        Ok(backend)
    }

    /// Encodes the backend as one entry of the backend table, without a count (what the host
    /// sends to `sluice_health_probe`). Fails if a string or the tag list is longer than a
    /// `u16` length allows.
    pub fn encode(&self) -> Result<Vec<u8>, TableError> {
        let mut out = Vec::with_capacity(16 + self.addr.len() + self.zone.len());
        write_entry(&mut out, self)?;
        Ok(out)
    }
}

/// The backends that may receive traffic (healthy, not ejected, not draining), in the host's
/// order. Index `i` here is index `i` in every host call and in the value `pick` returns.
/// It may be empty.
///
/// Besides the static table it answers live questions about each backend by asking the host;
/// those are cheap host calls, made only when you call them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backends {
    list: Vec<Backend>,
}

impl Backends {
    /// An empty table, usable in `const` and `static` contexts.
    pub const fn new() -> Self {
        Backends { list: Vec::new() }
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// `true` if there is no backend: `pick` can only return `None`.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Backend `i`, if in range.
    pub fn get(&self, i: usize) -> Option<&Backend> {
        self.list.get(i)
    }

    /// Iterates over the backends in index order.
    pub fn iter(&self) -> std::slice::Iter<'_, Backend> {
        self.list.iter()
    }

    /// The backends as a slice.
    pub fn as_slice(&self) -> &[Backend] {
        &self.list
    }

    /// Sum of all weights, widened so it cannot overflow.
    pub fn total_weight(&self) -> u64 {
        self.list.iter().map(|b| u64::from(b.weight)).sum()
    }

    /// Requests currently in flight to backend `i` across all worker threads; `None` if `i` is
    /// out of range.
    pub fn inflight(&self, i: usize) -> Option<u32> {
        let i = i32::try_from(i).ok()?;
        u32::try_from(host::backend_inflight(i)).ok()
    }

    /// Moving average of backend `i`'s response latency in microseconds (0 before its first
    /// response); `None` if `i` is out of range.
    pub fn latency_us(&self, i: usize) -> Option<u64> {
        let i = i32::try_from(i).ok()?;
        u64::try_from(host::backend_latency_us(i)).ok()
    }

    /// Consecutive failures (connect errors, 5xx) of backend `i`, reset by a success; `None` if
    /// `i` is out of range.
    pub fn failures(&self, i: usize) -> Option<u32> {
        let i = i32::try_from(i).ok()?;
        u32::try_from(host::backend_failures(i)).ok()
    }

    /// Decodes a table in the ABI format. Strict: truncation, invalid UTF-8 and trailing bytes
    /// are errors, since any of them means host and guest disagree about the format.
    pub fn decode(bytes: &[u8]) -> Result<Self, TableError> {
        let mut r = Reader { bytes, pos: 0 };
        let count = r.u32()? as usize;
        // Every entry takes at least MIN_ENTRY_LEN bytes, so a larger count is corrupt; checking
        // first keeps a corrupt count from reserving gigabytes.
        if count > r.remaining() / MIN_ENTRY_LEN {
            return Err(r.error("count larger than the table"));
        }
        let mut list = Vec::with_capacity(count);
        for _ in 0..count {
            list.push(read_entry(&mut r)?);
        }
        if r.remaining() != 0 {
            return Err(r.error("trailing bytes after the last backend"));
        }
        Ok(Backends { list })
    }

    /// Encodes the table in the ABI format (what the host sends). Fails if a string or the tag
    /// list is longer than a `u16` length allows, or the table longer than a `u32` count.
    pub fn encode(&self) -> Result<Vec<u8>, TableError> {
        let mut out = Vec::with_capacity(4 + self.list.len() * 32);
        let count =
            u32::try_from(self.list.len()).map_err(|_| TableError::encode("too many backends"))?;
        out.extend_from_slice(&count.to_le_bytes());
        for b in &self.list {
            write_entry(&mut out, b)?;
        }
        Ok(out)
    }
}

/// Reads one table entry.
fn read_entry(r: &mut Reader<'_>) -> Result<Backend, TableError> {
    let weight = r.u32()?;
    let flags = r.u32()?;
    let addr = r.string()?;
    let zone = r.string()?;
    let ntags = r.u16()?;
    let tags = (0..ntags)
        .map(|_| r.string())
        .collect::<Result<Vec<_>, _>>()?;
    // Reserved flag bits are ignored: the host may define them later without breaking
    // plugins built against this version.
    Ok(Backend {
        addr,
        weight,
        in_local_zone: flags & FLAG_LOCAL_ZONE != 0,
        zone,
        tags,
    })
}

/// Appends one table entry.
fn write_entry(out: &mut Vec<u8>, b: &Backend) -> Result<(), TableError> {
    out.extend_from_slice(&b.weight.to_le_bytes());
    let flags = if b.in_local_zone { FLAG_LOCAL_ZONE } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    put_string(out, &b.addr)?;
    put_string(out, &b.zone)?;
    let ntags = u16::try_from(b.tags.len()).map_err(|_| TableError::encode("too many tags"))?;
    out.extend_from_slice(&ntags.to_le_bytes());
    for t in &b.tags {
        put_string(out, t)?;
    }
    Ok(())
}

impl std::ops::Index<usize> for Backends {
    type Output = Backend;
    fn index(&self, i: usize) -> &Backend {
        &self.list[i]
    }
}

impl<'a> IntoIterator for &'a Backends {
    type Item = &'a Backend;
    type IntoIter = std::slice::Iter<'a, Backend>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

impl From<Vec<Backend>> for Backends {
    fn from(list: Vec<Backend>) -> Self {
        Backends { list }
    }
}

impl FromIterator<Backend> for Backends {
    fn from_iter<I: IntoIterator<Item = Backend>>(iter: I) -> Self {
        Backends {
            list: iter.into_iter().collect(),
        }
    }
}

/// A backend table that could not be decoded or encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableError {
    what: &'static str,
    offset: Option<usize>,
}

impl TableError {
    fn encode(what: &'static str) -> Self {
        TableError { what, offset: None }
    }
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(at) => write!(f, "backend table: {} at byte {at}", self.what),
            None => write!(f, "backend table: {}", self.what),
        }
    }
}

impl std::error::Error for TableError {}

fn put_string(out: &mut Vec<u8>, s: &str) -> Result<(), TableError> {
    let len =
        u16::try_from(s.len()).map_err(|_| TableError::encode("string longer than 65535 bytes"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn error(&self, what: &'static str) -> TableError {
        TableError {
            what,
            offset: Some(self.pos),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], TableError> {
        if self.remaining() < n {
            return Err(self.error("truncated"));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, TableError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, TableError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, TableError> {
        let len = self.u16()? as usize;
        let at = self.pos;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| TableError {
            what: "invalid UTF-8",
            offset: Some(at),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Backends {
        Backends::from(vec![
            Backend::new("127.0.0.1:9001"),
            Backend::new("[::1]:9002")
                .with_weight(5)
                .with_zone("eu-west-1a")
                .with_local_zone(true),
            Backend::new("10.0.0.3:80")
                .with_tag("canary")
                .with_tag("gpu"),
        ])
    }

    #[test]
    fn roundtrip() {
        let t = sample();
        let bytes = t.encode().unwrap();
        assert_eq!(Backends::decode(&bytes).unwrap(), t);
        assert_eq!(
            Backends::decode(&Backends::new().encode().unwrap()).unwrap(),
            Backends::new()
        );
    }

    #[test]
    fn encoding_is_the_abi_layout() {
        // Spelled out byte by byte from ABI.md, so a change to either side shows up here.
        let t = Backends::from(vec![Backend::new("a:1")
            .with_weight(3)
            .with_zone("z")
            .with_local_zone(true)
            .with_tag("t")]);
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &1u32.to_le_bytes()[..], // count
            &3u32.to_le_bytes(),     // weight
            &1u32.to_le_bytes(),     // flags: local zone
            &[3, 0], b"a:1",         // address
            &[1, 0], b"z",           // zone
            &[1, 0],                 // one tag
            &[1, 0], b"t",           // the tag
        ]
        .concat();
        assert_eq!(t.encode().unwrap(), expected);
        let d = Backends::decode(&expected).unwrap();
        assert_eq!(d[0].addr(), "a:1");
        assert_eq!(d[0].weight(), 3);
        assert!(d[0].in_local_zone());
        assert_eq!(d[0].zone(), Some("z"));
        assert!(d[0].has_tag("t") && !d[0].has_tag("u"));
    }

    #[test]
    fn reserved_flag_bits_are_ignored() {
        let mut bytes = Backends::from(vec![Backend::new("a:1")]).encode().unwrap();
        bytes[8] = 0b110; // flags of entry 0, reserved bits set, local bit clear
        let d = Backends::decode(&bytes).unwrap();
        assert!(!d[0].in_local_zone());
    }

    #[test]
    fn rejects_corrupt_tables() {
        let bytes = sample().encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(
                Backends::decode(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Backends::decode(&trailing)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let huge = u32::MAX.to_le_bytes();
        assert!(Backends::decode(&huge).is_err());
        let mut bad_utf8 = Backends::from(vec![Backend::new("ab")]).encode().unwrap();
        bad_utf8[14] = 0xff;
        assert_eq!(
            Backends::decode(&bad_utf8).unwrap_err().to_string(),
            "backend table: invalid UTF-8 at byte 14"
        );
    }

    #[test]
    fn single_entries_roundtrip_without_a_count() {
        for b in sample().iter() {
            let bytes = b.encode().unwrap();
            // An entry is exactly a one-backend table minus its count.
            let table = Backends::from(vec![b.clone()]).encode().unwrap();
            assert_eq!(bytes, table[4..]);
            assert_eq!(&Backend::decode(&bytes).unwrap(), b);
            for cut in 0..bytes.len() {
                assert!(Backend::decode(&bytes[..cut]).is_err());
            }
            let mut trailing = bytes.clone();
            trailing.push(0);
            assert!(Backend::decode(&trailing).is_err());
        }
    }

    #[test]
    fn encode_rejects_oversized_strings() {
        let t = Backends::from(vec![Backend::new("x".repeat(70_000))]);
        assert!(t.encode().is_err());
    }

    #[test]
    fn accessors() {
        let t = sample();
        assert_eq!(t.len(), 3);
        assert_eq!(t.total_weight(), 7);
        assert_eq!(t.get(1).and_then(Backend::zone), Some("eu-west-1a"));
        assert_eq!(t.get(0).and_then(Backend::zone), None);
        assert!(t.get(3).is_none());
        assert_eq!((&t).into_iter().filter(|b| b.has_tag("canary")).count(), 1);
    }
}
