//! The built-in TCP health check of sluice (`builtin:tcp`), written as an ordinary plugin.
//!
//! Without configuration it only connects: a backend that accepts the connection is healthy.
//! With `send` and/or `expect` it runs a small raw exchange, for protocols that are not HTTP
//! (`PING` → `+PONG` for Redis, a greeting banner for SMTP or SSH):
//!
//! | config key | default                          | meaning |
//! |------------|----------------------------------|---------|
//! | `send`     | none                             | text to send after connecting (TOML escapes such as `\r\n` work) |
//! | `expect`   | none                             | text that must occur in what is read back; without `send` the backend's banner is read |
//! | `read`     | 256 with `expect`, otherwise 0   | how many bytes to read back, at most 65536 |
//!
//! ```toml
//! health = { plugin = "builtin:tcp", interval = "2s", config = { send = "PING\r\n", expect = "+PONG", read = 7 } }
//! ```
//!
//! A check is healthy when the exchange completed and, with `expect`, the expected text was
//! read. The host reads until it has `read` bytes, the backend closes the connection, or the
//! pool's timeout: a backend that answers with fewer bytes and keeps the connection open
//! (Redis does) makes every check last until the timeout, so set `read` to the length of the
//! reply for such protocols. Bytes read before a timeout count when they contain `expect`.
//!
//! The configuration is strict: unknown keys, wrong types, `read = 0` or a `read` shorter than
//! `expect` stop the plugin from loading, with the reason.

use sluice_sdk::{
    log, Backend, Config, ConfigError, HealthCheck, Outcome, Probe, ProbeResult, Verdict,
};

/// Bytes read when `expect` is set and `read` is not.
pub const DEFAULT_READ: u32 = 256;
/// The most the host reads back from a raw TCP probe.
pub const MAX_READ: u32 = 64 * 1024;

/// The TCP health check.
#[derive(Debug)]
pub struct TcpCheck {
    probe: Probe,
    expect: Option<String>,
}

impl HealthCheck for TcpCheck {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&["send", "expect", "read"])?;
        let send = config.get_str("send")?;
        let expect = config.get_str("expect")?;
        let read = match config.get_u64("read")? {
            None if expect.is_some() => DEFAULT_READ,
            None => 0,
            Some(n) if n > u64::from(MAX_READ) => {
                return Err(
                    ConfigError::for_key("read", format!("at most {MAX_READ} bytes")).into(),
                )
            }
            Some(n) => n as u32,
        };
        if let Some(expect) = expect {
            if expect.is_empty() {
                return Err(ConfigError::for_key("expect", "must not be empty").into());
            }
            if (read as usize) < expect.len() {
                return Err(ConfigError::for_key(
                    "read",
                    format!("{read} bytes cannot hold `expect` ({} bytes)", expect.len()),
                )
                .into());
            }
        }
        let probe = match (send, read) {
            (None, 0) => Probe::TcpConnect,
            (send, read) => Probe::tcp(send.unwrap_or_default(), read),
        };
        Ok(TcpCheck {
            probe,
            expect: expect.map(str::to_owned),
        })
    }

    fn probe(&mut self, _backend: &Backend) -> Probe {
        self.probe.clone()
    }

    fn evaluate(&mut self, backend: &Backend, result: &ProbeResult) -> Verdict {
        let healthy = match &self.expect {
            None => result.is_completed(),
            // What was read is the proof, even if the exchange then ran into the timeout
            // waiting for more bytes.
            Some(expect) => {
                matches!(result.outcome(), Outcome::Completed | Outcome::TimedOut)
                    && result.body_contains(expect)
            }
        };
        if !healthy {
            let why = match (&self.expect, result.outcome()) {
                (Some(expect), Outcome::Completed) => {
                    format!("expected {expect:?}, read {:?}", result.body_str())
                }
                (_, outcome) => format!("{outcome:?}"),
            };
            log::debug(&format!("{}: unhealthy: {why}", backend.addr()));
        }
        Verdict::from(healthy)
    }
}

sluice_sdk::export_health_check!(TcpCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{HealthHarness, MockHost};

    fn backend() -> Backend {
        Backend::new("10.0.0.1:6379")
    }

    fn harness(config: &str) -> HealthHarness<TcpCheck> {
        HealthHarness::new(config).unwrap()
    }

    #[test]
    fn default_is_a_connect_check() {
        let mut h = harness("{}");
        assert_eq!(h.probe(&backend()), Probe::TcpConnect);
        assert_eq!(
            h.evaluate(&backend(), &ProbeResult::connected()),
            Verdict::Healthy
        );
        for r in [
            ProbeResult::connect_failed(),
            ProbeResult::timed_out(),
            ProbeResult::io_error(),
        ] {
            assert_eq!(h.evaluate(&backend(), &r), Verdict::Unhealthy, "{r:?}");
        }
    }

    #[test]
    fn send_and_expect() {
        let mut h = harness(r#"{"send": "PING\r\n", "expect": "+PONG", "read": 7}"#);
        assert_eq!(h.probe(&backend()), Probe::tcp("PING\r\n", 7));
        let pong = ProbeResult::tcp_read("+PONG\r\n");
        assert_eq!(h.evaluate(&backend(), &pong), Verdict::Healthy);
        let err = ProbeResult::tcp_read("-ERR NOAUTH\r\n");
        assert_eq!(h.evaluate(&backend(), &err), Verdict::Unhealthy);
        assert!(MockHost::take_logs().iter().any(|l| l
            .message
            .contains("expected \"+PONG\", read \"-ERR NOAUTH\\r\\n\"")));
        assert_eq!(
            h.evaluate(&backend(), &ProbeResult::connect_failed()),
            Verdict::Unhealthy
        );
        // Read until the timeout, but the answer was there.
        let slow = ProbeResult::timed_out().with_body("+PONG\r\n");
        assert_eq!(h.evaluate(&backend(), &slow), Verdict::Healthy);
        assert_eq!(
            h.evaluate(&backend(), &ProbeResult::timed_out()),
            Verdict::Unhealthy
        );
        // An I/O error is unhealthy even with the text.
        let broken = ProbeResult::io_error().with_body("+PONG");
        assert_eq!(h.evaluate(&backend(), &broken), Verdict::Unhealthy);
    }

    #[test]
    fn expect_alone_reads_the_banner() {
        let mut h = harness(r#"{"expect": "SSH-2.0"}"#);
        assert_eq!(h.probe(&backend()), Probe::tcp("", DEFAULT_READ));
        let banner = ProbeResult::tcp_read("SSH-2.0-OpenSSH_9.6\r\n");
        assert_eq!(h.evaluate(&backend(), &banner), Verdict::Healthy);
        let other = ProbeResult::tcp_read("220 smtp.example.com ESMTP\r\n");
        assert_eq!(h.evaluate(&backend(), &other), Verdict::Unhealthy);
    }

    #[test]
    fn send_without_expect_only_needs_the_exchange_to_complete() {
        let mut h = harness(r#"{"send": "QUIT\r\n"}"#);
        assert_eq!(h.probe(&backend()), Probe::tcp("QUIT\r\n", 0));
        assert_eq!(
            h.evaluate(&backend(), &ProbeResult::connected()),
            Verdict::Healthy
        );
        assert_eq!(
            h.evaluate(&backend(), &ProbeResult::io_error()),
            Verdict::Unhealthy
        );
        // `read` without `expect`: read and discard.
        let mut h = harness(r#"{"read": 16}"#);
        assert_eq!(h.probe(&backend()), Probe::tcp("", 16));
        let anything = ProbeResult::tcp_read("whatever");
        assert_eq!(h.evaluate(&backend(), &anything), Verdict::Healthy);
    }

    #[test]
    fn bad_configuration_is_refused() {
        for (cfg, needle) in [
            (r#"{"sned": "x"}"#, "`sned`"),
            (r#"{"send": 1}"#, "`send`"),
            (r#"{"read": -1}"#, "`read`"),
            (r#"{"read": 70000}"#, "at most 65536"),
            (r#"{"expect": ""}"#, "must not be empty"),
            (r#"{"expect": "+PONG", "read": 3}"#, "cannot hold"),
            (r#"{"expect": "+PONG", "read": 0}"#, "cannot hold"),
        ] {
            let err = HealthHarness::<TcpCheck>::new(cfg).unwrap_err();
            assert!(err.contains(needle), "{cfg}: {err}");
        }
    }
}
