//! A load-aware health check for sluice.
//!
//! Each check fetches a JSON status document from the backend, e.g.
//!
//! ```json
//! {"status": "ok", "load": 0.85}
//! ```
//!
//! and turns it into a verdict:
//!
//! - **Unhealthy** if the request fails (connect error, timeout, not HTTP), the status is not
//!   2xx, the body is not a JSON object with `"status": "ok"`, or `load` is present but not a
//!   non-negative number. Only the first 4 KiB of the body reach the plugin, so a larger
//!   document does not parse.
//! - **Degraded** when `load` is above `degrade_above`: the backend keeps a share of its weight
//!   that falls linearly from 100 % at `degrade_above` to 0 % at load 1.0, rounded and kept
//!   within `min_percent..=99` so an overloaded backend still gets a trickle of traffic (and
//!   the pool sees it recover). With the defaults (0.7, 10): load 0.85 → 50 %, 0.94 → 20 %,
//!   1.0 or more → 10 %.
//! - **Healthy** otherwise, including documents without `load`.
//!
//! | config key      | default     | meaning |
//! |-----------------|-------------|---------|
//! | `path`          | `"/status"` | where the status document is served |
//! | `host`          | none        | `Host` header (default: the backend address) |
//! | `degrade_above` | `0.7`       | load above which the backend is degraded, in `0.0..1.0` |
//! | `min_percent`   | `10`        | smallest share of its weight a degraded backend keeps, `1..=99` |

use sluice_sdk::serde::Deserialize;
use sluice_sdk::{log, serde_json, Backend, Config, HealthCheck, Probe, ProbeResult, Verdict};

/// The plugin's configuration; unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(crate = "sluice_sdk::serde", deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default = "default_degrade_above")]
    degrade_above: f64,
    #[serde(default = "default_min_percent")]
    min_percent: u8,
}

fn default_path() -> String {
    "/status".to_owned()
}

fn default_degrade_above() -> f64 {
    0.7
}

fn default_min_percent() -> u8 {
    10
}

/// The status document the backend serves. Other fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(crate = "sluice_sdk::serde")]
struct StatusDoc {
    status: String,
    #[serde(default)]
    load: Option<f64>,
}

/// The health check.
#[derive(Debug)]
pub struct LoadAware {
    probe: Probe,
    degrade_above: f64,
    min_percent: u8,
}

impl HealthCheck for LoadAware {
    fn init(config: &Config) -> Result<Self, String> {
        let s: Settings = config.deserialize()?;
        if !(0.0..1.0).contains(&s.degrade_above) {
            return Err(format!(
                "config key `degrade_above`: must be at least 0 and below 1, got {}",
                s.degrade_above
            ));
        }
        if !(1..=99).contains(&s.min_percent) {
            return Err(format!(
                "config key `min_percent`: must be 1..=99, got {}",
                s.min_percent
            ));
        }
        let mut probe = Probe::http_get(s.path).header("accept", "application/json");
        if let Some(host) = s.host {
            probe = probe.header("host", host);
        }
        // Refuse a path or host the proxy would refuse now, when the plugin loads.
        probe.validate()?;
        Ok(LoadAware {
            probe,
            degrade_above: s.degrade_above,
            min_percent: s.min_percent,
        })
    }

    fn probe(&mut self, _backend: &Backend) -> Probe {
        self.probe.clone()
    }

    fn evaluate(&mut self, backend: &Backend, result: &ProbeResult) -> Verdict {
        match self.judge(result) {
            Ok(verdict) => verdict,
            Err(why) => {
                log::debug(&format!("{}: unhealthy: {why}", backend.addr()));
                Verdict::Unhealthy
            }
        }
    }
}

impl LoadAware {
    /// The verdict for a usable document; `Err` says why the backend is unhealthy.
    fn judge(&self, result: &ProbeResult) -> Result<Verdict, String> {
        if !result.is_completed() {
            return Err(format!("{:?}", result.outcome()));
        }
        match result.status() {
            Some(200..=299) => {}
            other => return Err(format!("HTTP status {other:?}")),
        }
        let doc: StatusDoc = serde_json::from_slice(result.body())
            .map_err(|e| format!("unparsable status document: {e}"))?;
        if doc.status != "ok" {
            return Err(format!("status is {:?}", doc.status));
        }
        match doc.load {
            None => Ok(Verdict::Healthy),
            // JSON has no NaN, so a number is either negative or a load.
            Some(load) if load < 0.0 => Err(format!("load {load} is not a load")),
            Some(load) if load <= self.degrade_above => Ok(Verdict::Healthy),
            Some(load) => Ok(Verdict::Degraded(self.percent(load))),
        }
    }

    /// The share of its weight a backend above `degrade_above` keeps: linear from 100 at
    /// `degrade_above` to 0 at 1.0, within `min_percent..=99`.
    fn percent(&self, load: f64) -> u8 {
        let share = (1.0 - load) / (1.0 - self.degrade_above) * 100.0;
        // `as` saturates (and maps NaN to 0), then the clamp applies the floor.
        (share.round() as u8).clamp(self.min_percent, 99)
    }
}

sluice_sdk::export_health_check!(LoadAware);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{HealthHarness, MockHost};

    fn backend() -> Backend {
        Backend::new("10.0.0.7:8080")
    }

    fn check(config: &str, result: ProbeResult) -> Verdict {
        HealthHarness::<LoadAware>::new(config)
            .unwrap()
            .evaluate(&backend(), &result)
    }

    fn doc(body: &str) -> ProbeResult {
        ProbeResult::http(200)
            .with_header("content-type", "application/json")
            .with_body(body)
    }

    #[test]
    fn fetches_the_status_document() {
        let mut h = HealthHarness::<LoadAware>::new("{}").unwrap();
        assert_eq!(
            h.probe(&backend()),
            Probe::http_get("/status").header("accept", "application/json")
        );
        let mut h =
            HealthHarness::<LoadAware>::new(r#"{"path": "/internal/status", "host": "svc"}"#)
                .unwrap();
        assert_eq!(
            h.probe(&backend()),
            Probe::http_get("/internal/status")
                .header("accept", "application/json")
                .header("host", "svc")
        );
    }

    #[test]
    fn light_load_is_healthy() {
        assert_eq!(
            check("{}", doc(r#"{"status":"ok","load":0.2}"#)),
            Verdict::Healthy
        );
        assert_eq!(
            check("{}", doc(r#"{"status":"ok","load":0.7}"#)),
            Verdict::Healthy
        );
        assert_eq!(check("{}", doc(r#"{"status":"ok"}"#)), Verdict::Healthy);
        // Extra fields are fine.
        let extra = doc(r#"{"status":"ok","load":0.1,"version":"1.2.3","queues":[1,2]}"#);
        assert_eq!(check("{}", extra), Verdict::Healthy);
    }

    #[test]
    fn heavy_load_degrades_linearly_down_to_the_floor() {
        for (load, percent) in [
            (0.73, 90),
            (0.85, 50),
            (0.94, 20),
            (0.98, 10), // 6.7 % → the 10 % floor
            (1.0, 10),
            (3.5, 10),
        ] {
            let body = format!(r#"{{"status":"ok","load":{load}}}"#);
            assert_eq!(
                check("{}", doc(&body)),
                Verdict::Degraded(percent),
                "load {load}"
            );
        }
        // Just above the threshold rounds to 100, which stays a (barely) degraded 99.
        assert_eq!(
            check("{}", doc(r#"{"status":"ok","load":0.7001}"#)),
            Verdict::Degraded(99)
        );
        // Configured threshold and floor.
        let cfg = r#"{"degrade_above": 0.5, "min_percent": 25}"#;
        assert_eq!(
            check(cfg, doc(r#"{"status":"ok","load":0.5}"#)),
            Verdict::Healthy
        );
        assert_eq!(
            check(cfg, doc(r#"{"status":"ok","load":0.6}"#)),
            Verdict::Degraded(80)
        );
        assert_eq!(
            check(cfg, doc(r#"{"status":"ok","load":0.9}"#)),
            Verdict::Degraded(25)
        );
        // degrade_above = 0: any load degrades, by exactly the spare capacity.
        let cfg = r#"{"degrade_above": 0, "min_percent": 1}"#;
        assert_eq!(
            check(cfg, doc(r#"{"status":"ok","load":0.3}"#)),
            Verdict::Degraded(70)
        );
    }

    #[test]
    fn bad_answers_are_unhealthy() {
        for (result, why) in [
            (ProbeResult::connect_failed(), "ConnectFailed"),
            (ProbeResult::timed_out(), "TimedOut"),
            (ProbeResult::io_error(), "IoError"),
            (
                ProbeResult::http(503).with_body(r#"{"status":"ok"}"#),
                "HTTP status Some(503)",
            ),
            (
                doc(r#"{"status":"draining","load":0.1}"#),
                "status is \"draining\"",
            ),
            (doc(r#"{"load":0.1}"#), "unparsable"),
            (doc(r#"{"status":"ok","load":"high"}"#), "unparsable"),
            (doc(r#"{"status":"ok","load":-1}"#), "not a load"),
            (doc("ok"), "unparsable"),
            (doc(r#"{"status":"ok","load":0.1"#), "unparsable"), // cut off
            (doc(""), "unparsable"),
        ] {
            assert_eq!(
                check("{}", result.clone()),
                Verdict::Unhealthy,
                "{result:?}"
            );
            let logs = MockHost::take_logs();
            assert!(
                logs.iter().any(|l| l.message.contains(why)),
                "{why}: {logs:?}"
            );
        }
    }

    #[test]
    fn bad_configuration_is_refused() {
        for (cfg, needle) in [
            (r#"{"pth": "/status"}"#, "pth"),
            (r#"{"path": "status"}"#, "start with '/'"),
            (r#"{"host": "a\r\nb"}"#, "CR, LF"),
            (r#"{"degrade_above": 1.0}"#, "degrade_above"),
            (r#"{"degrade_above": -0.1}"#, "degrade_above"),
            (r#"{"degrade_above": "high"}"#, "invalid type"),
            (r#"{"min_percent": 0}"#, "min_percent"),
            (r#"{"min_percent": 100}"#, "min_percent"),
        ] {
            let err = HealthHarness::<LoadAware>::new(cfg).unwrap_err();
            assert!(err.contains(needle), "{cfg}: {err}");
        }
    }
}
