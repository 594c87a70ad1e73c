//! The built-in HTTP health check of sluice (`builtin:http`), written as an ordinary plugin.
//!
//! Every check sends one HTTP/1.1 request to the backend and calls it healthy when the response
//! has an expected status and, optionally, the body contains a marker. A connection that fails,
//! times out or does not answer with valid HTTP is unhealthy. The host turns single verdicts
//! into state changes with the pool's `rise`/`fall` thresholds.
//!
//! | config key        | default       | meaning |
//! |-------------------|---------------|---------|
//! | `path`            | `"/healthz"`  | request target, starting with `/`; may carry a query |
//! | `method`          | `"GET"`       | request method (upper-cased) |
//! | `host`            | none          | `Host` header; without it the host sends the backend address |
//! | `expected_status` | `["200-399"]` | accepted statuses: a list of codes (`204`, `"204"`), ranges (`"200-299"`) or classes (`"2xx"`); a single value is accepted too |
//! | `body_contains`   | none          | text that must occur in the first 4 KiB of the body |
//! | `headers`         | `{}`          | extra request headers, `{ name = "value" }` |
//!
//! ```toml
//! health = { plugin = "builtin:http", interval = "2s", config = { path = "/ready", expected_status = ["200", "204"], body_contains = "ok" } }
//! ```
//!
//! The configuration is strict: an unknown key, a value of the wrong type, a status outside
//! 100–599 or a header the host would refuse stops the plugin from loading, with the reason.
//! The probe is built and validated once, in `init`; each check only clones it.

use sluice_sdk::serde_json::Value;
use sluice_sdk::{log, Backend, Config, ConfigError, HealthCheck, Probe, ProbeResult, Verdict};

const KEYS: &[&str] = &[
    "path",
    "method",
    "host",
    "expected_status",
    "body_contains",
    "headers",
];

/// The HTTP health check.
#[derive(Debug)]
pub struct HttpCheck {
    probe: Probe,
    /// Accepted statuses as inclusive ranges.
    expected: Vec<(u16, u16)>,
    body_contains: Option<String>,
}

impl HealthCheck for HttpCheck {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(KEYS)?;
        let path = config.get_str("path")?.unwrap_or("/healthz");
        let method = config
            .get_str("method")?
            .unwrap_or("GET")
            .to_ascii_uppercase();
        // The host's rules for methods, paths and headers, checked now rather than per check
        // and reported against the key at fault.
        let invalid =
            |key: &str, e: sluice_sdk::WireError| ConfigError::for_key(key, e.to_string());
        Probe::http(method.as_str(), "/")
            .validate()
            .map_err(|e| invalid("method", e))?;
        Probe::http_get(path)
            .validate()
            .map_err(|e| invalid("path", e))?;
        let mut probe = Probe::http(method, path);
        if let Some(host) = config.get_str("host")? {
            probe = probe.header("host", host);
            probe.validate().map_err(|e| invalid("host", e))?;
        }
        match config.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (name, value) in map {
                    let Some(value) = value.as_str() else {
                        return Err(ConfigError::for_key(
                            "headers",
                            format!("the value of header `{name}` must be a string, got {value}"),
                        )
                        .into());
                    };
                    if name.eq_ignore_ascii_case("host") && config.get("host").is_some() {
                        return Err(ConfigError::for_key(
                            "headers",
                            "sets `host` as well as the `host` key; use one",
                        )
                        .into());
                    }
                    probe = probe.header(name.as_str(), value);
                }
            }
            Some(other) => {
                return Err(ConfigError::for_key(
                    "headers",
                    format!("expected a table of header names to values, got {other}"),
                )
                .into())
            }
        }
        probe.validate().map_err(|e| invalid("headers", e))?;
        let expected = match config.get("expected_status") {
            None | Some(Value::Null) => vec![(200, 399)],
            Some(v) => parse_statuses(v).map_err(|m| ConfigError::for_key("expected_status", m))?,
        };
        let body_contains = config.get_str("body_contains")?.map(str::to_owned);
        Ok(HttpCheck {
            probe,
            expected,
            body_contains,
        })
    }

    fn probe(&mut self, _backend: &Backend) -> Probe {
        self.probe.clone()
    }

    fn evaluate(&mut self, backend: &Backend, result: &ProbeResult) -> Verdict {
        match self.reason_unhealthy(result) {
            None => Verdict::Healthy,
            Some(why) => {
                // Checks run every few seconds, not per request: formatting is affordable, and
                // the host rate-limits plugin logs.
                log::debug(&format!("{}: unhealthy: {why}", backend.addr()));
                Verdict::Unhealthy
            }
        }
    }
}

impl HttpCheck {
    /// Why `result` is unhealthy, `None` if it is healthy.
    fn reason_unhealthy(&self, result: &ProbeResult) -> Option<String> {
        if !result.is_completed() {
            return Some(format!("{:?}", result.outcome()));
        }
        let Some(status) = result.status() else {
            return Some("no HTTP status".to_owned());
        };
        if !self
            .expected
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
        {
            return Some(format!("unexpected status {status}"));
        }
        if let Some(needle) = &self.body_contains {
            if !result.body_contains(needle) {
                return Some(format!("body does not contain {needle:?}"));
            }
        }
        None
    }
}

/// Parses `expected_status`: one value or a non-empty list of them.
fn parse_statuses(v: &Value) -> Result<Vec<(u16, u16)>, String> {
    let items = match v {
        Value::Array(items) if items.is_empty() => {
            return Err("must list at least one status".to_owned())
        }
        Value::Array(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    items.iter().map(parse_status).collect()
}

/// One status spec: `204`, `"204"`, `"200-299"` or `"2xx"`, as an inclusive range.
fn parse_status(v: &Value) -> Result<(u16, u16), String> {
    let range = match v {
        Value::Number(n) => {
            let code = n
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .ok_or_else(|| format!("{n} is not a status code"))?;
            (code, code)
        }
        Value::String(s) => parse_status_str(s.trim()).ok_or_else(|| {
            format!("{s:?} is not a status, a range like \"200-299\" or a class like \"2xx\"")
        })?,
        other => return Err(format!("expected status codes or ranges, got {other}")),
    };
    match range {
        (lo, hi) if (100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi => Ok(range),
        (lo, hi) if lo > hi => Err(format!("range {lo}-{hi} is empty")),
        (lo, hi) if lo == hi => Err(format!("{lo} is not an HTTP status (100-599)")),
        (lo, hi) => Err(format!("{lo}-{hi} is outside the HTTP statuses (100-599)")),
    }
}

fn parse_status_str(s: &str) -> Option<(u16, u16)> {
    if let Some((lo, hi)) = s.split_once('-') {
        return Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?));
    }
    let b = s.as_bytes();
    if b.len() == 3 && b[0].is_ascii_digit() && b[1..].eq_ignore_ascii_case(b"xx") {
        let class = u16::from(b[0] - b'0') * 100;
        return Some((class, class + 99));
    }
    let code = s.parse().ok()?;
    Some((code, code))
}

sluice_sdk::export_health_check!(HttpCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{HealthHarness, MockHost};

    fn backend() -> Backend {
        Backend::new("10.0.0.1:8080")
    }

    fn harness(config: &str) -> HealthHarness<HttpCheck> {
        HealthHarness::new(config).unwrap()
    }

    fn verdict(config: &str, result: ProbeResult) -> Verdict {
        harness(config).evaluate(&backend(), &result)
    }

    #[test]
    fn defaults_get_healthz_and_accept_2xx_3xx() {
        let mut h = harness("{}");
        assert_eq!(h.probe(&backend()), Probe::http_get("/healthz"));
        for status in [200, 204, 301, 399] {
            assert_eq!(
                h.evaluate(&backend(), &ProbeResult::http(status)),
                Verdict::Healthy
            );
        }
        for status in [100, 199, 400, 404, 500, 503] {
            assert_eq!(
                h.evaluate(&backend(), &ProbeResult::http(status)),
                Verdict::Unhealthy,
                "{status}"
            );
        }
    }

    #[test]
    fn failures_are_unhealthy() {
        for r in [
            ProbeResult::connect_failed(),
            ProbeResult::timed_out(),
            ProbeResult::io_error(),
            // Completed without a status cannot happen for HTTP; still not healthy.
            ProbeResult::connected(),
        ] {
            assert_eq!(verdict("{}", r.clone()), Verdict::Unhealthy, "{r:?}");
        }
        let logs = MockHost::take_logs();
        assert!(logs[0].message.contains("no HTTP status"), "{logs:?}");
    }

    #[test]
    fn request_is_configurable() {
        let mut h = harness(
            r#"{"path": "/ready?deep=1", "method": "head", "host": "api.internal",
                "headers": {"x-probe": "sluice", "accept": "text/plain"}}"#,
        );
        let Probe::Http {
            method,
            path,
            mut headers,
            body,
        } = h.probe(&backend())
        else {
            panic!("not an HTTP probe");
        };
        assert_eq!((method.as_str(), path.as_str()), ("HEAD", "/ready?deep=1"));
        assert!(body.is_empty());
        // `host` first; the order of the `headers` table is serde_json's (feature-dependent).
        assert_eq!(headers.remove(0), ("host".into(), "api.internal".into()));
        headers.sort();
        assert_eq!(
            headers,
            [
                ("accept".to_owned(), "text/plain".to_owned()),
                ("x-probe".to_owned(), "sluice".to_owned())
            ]
        );
        // A host set through `headers` works too.
        let mut h = harness(r#"{"headers": {"Host": "a"}}"#);
        assert_eq!(
            h.probe(&backend()),
            Probe::http_get("/healthz").header("Host", "a")
        );
    }

    #[test]
    fn expected_status_forms() {
        let cfg = r#"{"expected_status": [204, "200", "301-302", "4xx"]}"#;
        for (status, want) in [
            (200, true),
            (204, true),
            (201, false),
            (301, true),
            (302, true),
            (303, false),
            (404, true),
            (499, true),
            (500, false),
        ] {
            assert_eq!(
                verdict(cfg, ProbeResult::http(status)).is_healthy(),
                want,
                "{status}"
            );
        }
        assert!(verdict(r#"{"expected_status": "5XX"}"#, ProbeResult::http(503)).is_healthy());
        assert!(verdict(r#"{"expected_status": 200}"#, ProbeResult::http(200)).is_healthy());
        assert!(!verdict(r#"{"expected_status": 200}"#, ProbeResult::http(204)).is_healthy());
    }

    #[test]
    fn body_contains_searches_the_prefix() {
        let cfg = r#"{"body_contains": "\"status\":\"ok\""}"#;
        let ok = ProbeResult::http(200).with_body(r#"{"status":"ok","n":1}"#);
        assert_eq!(verdict(cfg, ok), Verdict::Healthy);
        let bad = ProbeResult::http(200).with_body(r#"{"status":"degraded"}"#);
        assert_eq!(verdict(cfg, bad), Verdict::Unhealthy);
        // The status is checked first.
        let wrong_status = ProbeResult::http(500).with_body(r#"{"status":"ok"}"#);
        assert_eq!(verdict(cfg, wrong_status), Verdict::Unhealthy);
    }

    #[test]
    fn bad_configuration_is_refused() {
        for (cfg, needle) in [
            (r#"{"paht": "/x"}"#, "`paht`"),
            (r#"{"path": 3}"#, "`path`"),
            (r#"{"path": "healthz"}"#, "start with '/'"),
            (r#"{"path": "/a b"}"#, "spaces"),
            (r#"{"method": "G ET"}"#, "method"),
            (r#"{"expected_status": []}"#, "at least one"),
            (r#"{"expected_status": ["abc"]}"#, "\"abc\""),
            (r#"{"expected_status": [700]}"#, "700"),
            (r#"{"expected_status": ["399-200"]}"#, "empty"),
            (r#"{"expected_status": ["0-999"]}"#, "outside"),
            (r#"{"expected_status": [true]}"#, "expected status"),
            (r#"{"expected_status": -1}"#, "not a status"),
            (r#"{"headers": ["a"]}"#, "table"),
            (r#"{"headers": {"a": 1}}"#, "`a`"),
            (r#"{"headers": {"bad name": "x"}}"#, "token"),
            (r#"{"headers": {"a": "x\r\nb: y"}}"#, "CR, LF"),
            (
                r#"{"host": "a\nb"}"#,
                "config key `host`: probe: header value",
            ),
            (r#"{"path": "x"}"#, "config key `path`"),
            (r#"{"method": "g-t"}"#, "config key `method`"),
            (r#"{"host": "a", "headers": {"HOST": "b"}}"#, "use one"),
            (r#"{"body_contains": 1}"#, "`body_contains`"),
        ] {
            let err = HealthHarness::<HttpCheck>::new(cfg).unwrap_err();
            assert!(err.contains(needle), "{cfg}: {err}");
        }
    }
}
