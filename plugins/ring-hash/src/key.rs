//! The request key, the fallback for requests without one, and the bounded-load walk: the
//! parts of consistent hashing that do not depend on how keys are mapped to backends.
//!
//! Shared by `ring-hash` (which owns this file) and `maglev`, which includes it with
//! `#[path = "../../ring-hash/src/key.rs"]`. It is not a library crate of its own because every
//! directory under `plugins/` is built as a plugin, and not reached through a dependency on the
//! ring-hash crate because that would link ring-hash's wasm exports into maglev too. Ideally it
//! would be a public module of the SDK.
//!
//! Configuration keys handled here ([`CONFIG_KEYS`]):
//!
//! | key | values | default |
//! |---|---|---|
//! | `key` | `"client_ip"`, `"header:NAME"`, `"cookie:NAME"`, `"path"`, `"query:NAME"` | `"client_ip"` |
//! | `fallback` | `"random"`, `"client_ip"`: what to hash when the request has no key | `"random"` |
//! | `bounded_load` | number ≥ 1, e.g. `1.25`; absent = unbounded | absent |

use sluice_sdk::select::Visited;
use sluice_sdk::{random_u64, Attr, Backends, Config, ConfigError, Request};

/// The configuration keys [`HashKey::from_config`] reads; a plugin adds its own to these when
/// rejecting unknown keys.
pub const CONFIG_KEYS: [&str; 3] = ["key", "fallback", "bounded_load"];

/// Largest accepted `bounded_load`. Beyond this the bound never binds in practice, so a larger
/// value is more likely a unit mistake (a percentage, say) than intent.
const MAX_BOUNDED_LOAD: f64 = 100.0;

/// What identifies a request for hashing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// The client's IP address.
    ClientIp,
    /// The first value of a header (name case-insensitive).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// The path without the query string.
    Path,
    /// A query parameter (raw).
    Query(String),
}

impl Key {
    /// Parses the `key` option.
    pub fn parse(s: &str) -> Result<Key, ConfigError> {
        let named = |prefix: &str, make: fn(String) -> Key| -> Option<Result<Key, ConfigError>> {
            let name = s.strip_prefix(prefix)?;
            Some(if name.is_empty() {
                Err(ConfigError::for_key(
                    "key",
                    format!("`{prefix}` needs a name, e.g. `{prefix}x-user`"),
                ))
            } else {
                Ok(make(name.to_owned()))
            })
        };
        match s {
            "client_ip" => Ok(Key::ClientIp),
            "path" => Ok(Key::Path),
            _ => named("header:", Key::Header)
                .or_else(|| named("cookie:", Key::Cookie))
                .or_else(|| named("query:", Key::Query))
                .unwrap_or_else(|| {
                    Err(ConfigError::for_key(
                        "key",
                        format!(
                            "unknown key `{s}`; expected \"client_ip\", \"path\", \
                             \"header:NAME\", \"cookie:NAME\" or \"query:NAME\""
                        ),
                    ))
                }),
        }
    }

    fn attr(&self) -> Attr<'_> {
        match self {
            Key::ClientIp => Attr::ClientIp,
            Key::Header(n) => Attr::Header(n),
            Key::Cookie(n) => Attr::Cookie(n),
            Key::Path => Attr::Path,
            Key::Query(n) => Attr::Query(n),
        }
    }
}

/// What to hash when a request lacks its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// A random number: keyless requests spread evenly and have no affinity.
    Random,
    /// The client IP (and a random number if that is missing too).
    ClientIp,
}

/// The key options plus the per-table state of the bounded-load walk, allocated in
/// [`HashKey::on_backends`] so that picks allocate nothing.
#[derive(Debug)]
pub struct HashKey {
    key: Key,
    fallback: Fallback,
    bounded_load: Option<f64>,
    weights: Vec<u32>,
    total_weight: u64,
    /// In-flight counts read at the start of a bounded pick.
    loads: Vec<u32>,
    /// Backends already considered in the current walk, so each costs at most one `excluded`
    /// call however often it recurs on the ring/table.
    visited: Visited,
}

impl HashKey {
    /// Reads `key`, `fallback` and `bounded_load`. Unknown keys are the caller's to reject.
    pub fn from_config(config: &Config) -> Result<HashKey, ConfigError> {
        let key = Key::parse(config.get_str("key")?.unwrap_or("client_ip"))?;
        let fallback = match config.get_str("fallback")?.unwrap_or("random") {
            "random" => Fallback::Random,
            "client_ip" => Fallback::ClientIp,
            other => {
                return Err(ConfigError::for_key(
                    "fallback",
                    format!("unknown fallback `{other}`; expected \"random\" or \"client_ip\""),
                ))
            }
        };
        let bounded_load = config.get_f64("bounded_load")?;
        if let Some(c) = bounded_load {
            // NaN fails the range check too.
            if !(1.0..=MAX_BOUNDED_LOAD).contains(&c) {
                return Err(ConfigError::for_key(
                    "bounded_load",
                    format!(
                        "must be a factor between 1 and {MAX_BOUNDED_LOAD} (e.g. 1.25: no backend \
                         takes more than 125% of the average load), got {c}"
                    ),
                ));
            }
        }
        Ok(HashKey {
            key,
            fallback,
            bounded_load,
            weights: Vec::new(),
            total_weight: 0,
            loads: Vec::new(),
            visited: Visited::default(),
        })
    }

    /// Sizes the per-backend state for a new table.
    pub fn on_backends(&mut self, backends: &Backends) {
        self.weights = backends.iter().map(|b| b.weight().max(1)).collect();
        self.total_weight = self.weights.iter().map(|&w| u64::from(w)).sum();
        self.loads = vec![0; backends.len()];
        self.visited = Visited::new(backends.len());
    }

    /// The hash to place `req` with: the key's hash (computed by the host, nothing copied),
    /// else the fallback's.
    pub fn hash(&self, req: &Request) -> u64 {
        if let Some(h) = req.hash(self.key.attr()) {
            return h;
        }
        match self.fallback {
            Fallback::ClientIp => req.hash(Attr::ClientIp).unwrap_or_else(random_u64),
            Fallback::Random => random_u64(),
        }
    }

    /// Walks one lap of `owners` (the backend of each ring point or table entry) clockwise from
    /// position `start`, wrapping past the end, and returns the first backend that `req` has not
    /// tried and that is under its load bound.
    ///
    /// The bound ("consistent hashing with bounded loads", Mirrokni et al.) is
    /// `inflight(i) + 1 <= ceil(c × (total_inflight + 1) × weight(i) / total_weight)`, which
    /// for equal weights is `ceil(c × (total + 1) / n)`: no backend takes more than `c` times
    /// its fair share, and a key only moves off its home backend while that one is overloaded.
    /// Some backend always satisfies it (the bounds sum to more than the total), but if every
    /// untried backend is over its bound, which racy counts or exclusions can cause, the first
    /// untried one is returned: an overloaded backend beats no backend. Backends that appear
    /// nowhere in the lap are tried last, in index order.
    pub fn choose(
        &mut self,
        req: &Request,
        backends: &Backends,
        owners: &[u32],
        start: usize,
    ) -> Option<usize> {
        let steps = owners.len();
        if self.weights.is_empty() || steps == 0 {
            return None;
        }
        let candidate = |k: usize| owners[(start + k) % steps] as usize;
        let retry = req.attempt() > 0;
        if !retry && self.bounded_load.is_none() {
            return Some(candidate(0));
        }
        // Per-unit-of-weight share of the bound, computed once for the pick.
        let scale = self.bounded_load.map(|c| {
            let mut total = 0u64;
            for (i, load) in self.loads.iter_mut().enumerate() {
                *load = backends.inflight(i).unwrap_or(0);
                total += u64::from(*load);
            }
            c * (total + 1) as f64 / self.total_weight as f64
        });
        self.visited.clear();
        let mut first_untried = None;
        for k in 0..steps {
            let i = candidate(k);
            if !self.visited.insert(i) {
                continue;
            }
            if !(retry && req.is_excluded(i)) {
                match scale {
                    Some(s) if !under_bound(self.loads[i], self.weights[i], s) => {
                        first_untried.get_or_insert(i);
                    }
                    _ => return Some(i),
                }
            }
            if self.visited.is_full() {
                break;
            }
        }
        if first_untried.is_none() && !self.visited.is_full() {
            // Some backends own no point of the lap (a Maglev table smaller than the pool):
            // still better than no backend for a retry.
            first_untried = (0..self.weights.len())
                .find(|&i| !self.visited.contains(i) && (!retry || !req.is_excluded(i)));
        }
        first_untried
    }
}

/// `load + 1 <= ceil(scale × weight)`.
fn under_bound(load: u32, weight: u32, scale: f64) -> bool {
    f64::from(load) + 1.0 <= (scale * f64::from(weight)).ceil()
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn parses_keys() {
        assert_eq!(Key::parse("client_ip").unwrap(), Key::ClientIp);
        assert_eq!(Key::parse("path").unwrap(), Key::Path);
        assert_eq!(
            Key::parse("header:x-user").unwrap(),
            Key::Header("x-user".into())
        );
        assert_eq!(Key::parse("cookie:sid").unwrap(), Key::Cookie("sid".into()));
        assert_eq!(Key::parse("query:u").unwrap(), Key::Query("u".into()));
        assert!(Key::parse("header:")
            .unwrap_err()
            .to_string()
            .contains("needs a name"));
        assert!(Key::parse("ip")
            .unwrap_err()
            .to_string()
            .contains("unknown key `ip`"));
    }

    #[test]
    fn validates_options() {
        let bad = |json: &str| HashKey::from_config(&Config::from_json(json).unwrap()).unwrap_err();
        assert_eq!(bad(r#"{"fallback": "none"}"#).key(), Some("fallback"));
        assert_eq!(bad(r#"{"bounded_load": 0.5}"#).key(), Some("bounded_load"));
        assert_eq!(bad(r#"{"bounded_load": 125}"#).key(), Some("bounded_load"));
        assert_eq!(
            bad(r#"{"bounded_load": "1.25"}"#).key(),
            Some("bounded_load")
        );
        assert_eq!(bad(r#"{"key": 5}"#).key(), Some("key"));
        let ok = HashKey::from_config(&Config::from_json(r#"{"bounded_load": 1}"#).unwrap());
        assert_eq!(ok.unwrap().bounded_load, Some(1.0));
    }

    #[test]
    fn bound_is_ceiling_of_fair_share() {
        // c = 1.25, 7 in flight over 4 equal backends: ceil(1.25 × 8 / 4) = ceil(2.5) = 3.
        let scale = 1.25 * 8.0 / 4.0;
        assert!(under_bound(2, 1, scale));
        assert!(!under_bound(3, 1, scale));
    }
}
