//! Canary routing as a sluice strategy plugin.
//!
//! Requests that carry a marker header go to the backends tagged as canaries; all other
//! requests go round-robin over the rest, so canaries only see traffic that opted in.
//!
//! Configuration (all optional):
//!
//! | key      | default      | meaning                                                         |
//! |----------|--------------|-----------------------------------------------------------------|
//! | `header` | `"x-canary"` | the header that marks a canary request (case-insensitive name)  |
//! | `value`  | none         | if set, the header must have exactly this value; else presence  |
//! | `tag`    | `"canary"`   | the backend tag that marks a canary backend                     |
//!
//! If the wanted group has no backend left to try (none exists, or a retry already tried them
//! all), the request falls back to any backend it has not tried, rather than failing with 503:
//! a canary request still gets an answer when the canaries are down.

use sluice_sdk::{counter_add, Backends, Config, Request, Strategy};

/// Shared counters used for rotation: one per group, so each group rotates evenly on its own.
const STABLE_SLOT: u32 = 0;
const CANARY_SLOT: u32 = 1;

/// The canary strategy.
#[derive(Debug)]
pub struct Canary {
    header: String,
    value: Option<String>,
    tag: String,
    /// Table indexes of canary and stable backends, rebuilt on every table change so that
    /// `pick` only indexes into them.
    canary: Vec<usize>,
    stable: Vec<usize>,
}

impl Canary {
    fn is_canary_request(&self, req: &mut Request) -> bool {
        match (req.header(&self.header), &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(got), Some(want)) => got == want,
        }
    }
}

impl Strategy for Canary {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&["header", "value", "tag"])?;
        let header = config.get_str("header")?.unwrap_or("x-canary");
        if header.is_empty() {
            return Err("config key `header`: must not be empty".into());
        }
        Ok(Canary {
            header: header.to_owned(),
            value: config.get_str("value")?.map(str::to_owned),
            tag: config.get_str("tag")?.unwrap_or("canary").to_owned(),
            canary: Vec::new(),
            stable: Vec::new(),
        })
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.canary.clear();
        self.stable.clear();
        for (i, b) in backends.iter().enumerate() {
            if b.has_tag(&self.tag) {
                self.canary.push(i);
            } else {
                self.stable.push(i);
            }
        }
    }

    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
        let (group, slot) = if self.is_canary_request(req) {
            (&self.canary, CANARY_SLOT)
        } else {
            (&self.stable, STABLE_SLOT)
        };
        if let Some(i) = rotate(req, group.len(), slot, |k| group[k]) {
            return Some(i);
        }
        // Nothing left in the wanted group: any untried backend of the whole table.
        rotate(req, backends.len(), slot, |k| k)
    }
}

/// Round-robin over `n` candidates (`index(k)` maps candidate `k` to a table index), starting
/// at the next ticket of the shared counter `slot` and skipping backends this request tried.
fn rotate(req: &Request, n: usize, slot: u32, index: impl Fn(usize) -> usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let start = (counter_add(slot, 1).ok()? as u64 % n as u64) as usize;
    (0..n)
        .map(|k| index((start + k) % n))
        // On the first attempt nothing is excluded; skip the host calls.
        .find(|&i| req.attempt() == 0 || !req.is_excluded(i))
}

sluice_sdk::export_strategy!(Canary);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{Harness, TestRequest};
    use sluice_sdk::Backend;

    /// Backends 0 and 2 are stable, 1 and 3 are canaries.
    fn table() -> Vec<Backend> {
        vec![
            Backend::new("10.0.0.1:80"),
            Backend::new("10.0.0.2:80").with_tag("canary"),
            Backend::new("10.0.0.3:80"),
            Backend::new("10.0.0.4:80")
                .with_tag("canary")
                .with_tag("gpu"),
        ]
    }

    fn harness(config: &str) -> Harness<Canary> {
        let mut h = Harness::new(config).unwrap();
        h.set_backends(&table());
        h
    }

    fn picks(h: &mut Harness<Canary>, req: &TestRequest, n: usize) -> Vec<usize> {
        (0..n).map(|_| h.pick(req).unwrap()).collect()
    }

    #[test]
    fn plain_requests_rotate_over_stable_backends() {
        let mut h = harness("{}");
        assert_eq!(picks(&mut h, &TestRequest::new(), 4), [0, 2, 0, 2]);
    }

    #[test]
    fn marked_requests_rotate_over_canaries() {
        let mut h = harness("{}");
        let canary = TestRequest::new().header("X-Canary", "1");
        assert_eq!(picks(&mut h, &canary, 4), [1, 3, 1, 3]);
        // Each group has its own rotation: canary traffic did not move the stable one.
        assert_eq!(h.pick(&TestRequest::new()), Some(0));
    }

    #[test]
    fn configured_header_value_and_tag() {
        let mut h = harness(r#"{"header": "x-release", "value": "beta", "tag": "gpu"}"#);
        assert_eq!(
            h.pick(&TestRequest::new().header("x-release", "beta")),
            Some(3)
        );
        // Wrong value or the default header name: stable (everything not tagged `gpu`).
        assert_eq!(
            picks(&mut h, &TestRequest::new().header("x-release", "stable"), 3),
            [0, 1, 2]
        );
        assert_eq!(
            h.pick(&TestRequest::new().header("x-canary", "beta")),
            Some(0)
        );
    }

    #[test]
    fn falls_back_when_the_group_is_empty() {
        let mut h = Harness::<Canary>::new("{}").unwrap();
        h.set_backends(&[Backend::new("a:1"), Backend::new("b:1")]);
        let canary = TestRequest::new().header("x-canary", "yes");
        let mut got = picks(&mut h, &canary, 2);
        got.sort_unstable();
        assert_eq!(got, [0, 1]);

        h.set_backends(&[Backend::new("a:1").with_tag("canary")]);
        assert_eq!(
            h.pick(&TestRequest::new()),
            Some(0),
            "only canaries left: stable traffic uses them"
        );

        h.set_backends(&[]);
        assert_eq!(h.pick(&canary), None);
    }

    #[test]
    fn retries_leave_the_group_only_when_it_is_exhausted() {
        let mut h = harness("{}");
        let canary = TestRequest::new().header("x-canary", "1");
        let tried = h.retries(&canary);
        assert_eq!(tried.len(), 4, "every backend is tried once: {tried:?}");
        let mut first_two = tried[..2].to_vec();
        first_two.sort_unstable();
        assert_eq!(first_two, [1, 3], "canaries first: {tried:?}");
    }

    #[test]
    fn bad_config_is_refused() {
        let err = Harness::<Canary>::new(r#"{"haeder": "x"}"#).unwrap_err();
        assert!(err.contains("haeder"), "{err}");
        let err = Harness::<Canary>::new(r#"{"value": 1}"#).unwrap_err();
        assert!(err.contains("`value`"), "{err}");
        assert!(Harness::<Canary>::new(r#"{"header": ""}"#).is_err());
    }
}
