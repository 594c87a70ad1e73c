//! Listeners: the addresses the proxy accepts clients on and what each one does: TLS with
//! certificates chosen by SNI and optional client certificates (mTLS), and its own client limits
//! and access log over the `[server.limits]` and `[server.access_log]` defaults.
//!
//! Three forms declare listeners and are resolved into one list of [`Listener`]s when the file
//! is loaded: `[server] listen` (plain), `[server.tls] listen` (TLS) and `[[server.listener]]`.
//! The certificate files themselves are read by the server (they are checked by `sluice check`
//! and on every reload, before anything is swapped).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::Spanned;

use crate::access_log::AccessLogConfig;
use crate::config::{default_listen, parse_listen, ClientLimits, Config, ConfigError};

/// Whether a TLS listener asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// No client certificate is asked for.
    None,
    /// A certificate is asked for; a client without one is served, one with a certificate the
    /// CA did not sign is refused.
    Optional,
    /// A client without a certificate signed by the CA is refused in the handshake.
    Required,
}

/// `[[server.tls.certificate]]`: one certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// SNI names it is served for (`*.example.com` for one label); empty: the certificate's DNS
    /// subject alternative names (or its common name when it has none).
    #[serde(default)]
    pub names: Vec<String>,
    /// Served when the client sends no SNI name or one no certificate has.
    #[serde(default)]
    pub default: bool,
}

/// `[[server.listener]]`: one listen address with its own settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `IP:port`.
    pub address: Spanned<String>,
    /// Terminate TLS with the `[server.tls]` certificates.
    #[serde(default)]
    pub tls: bool,
    /// Client CA for this listener (default: `[server.tls] client_ca`).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Client certificate policy for this listener (default: `[server.tls] client_auth`).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// Any `[server.limits]` keys, overriding the global ones on this listener.
    #[serde(default)]
    pub limits: Option<Spanned<toml::Table>>,
    /// Any `[server.access_log]` keys, overriding the global ones on this listener.
    #[serde(default)]
    pub access_log: Option<Spanned<toml::Table>>,
}

/// A TLS listener's client certificate check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCheck {
    /// PEM file of the accepted CAs (resolved against the config's directory).
    pub ca: PathBuf,
    /// A client without a certificate is refused.
    pub required: bool,
}

/// A proxy listener, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `None`: plain text. `Some(None)`: TLS without client certificates.
    pub tls: Option<Option<ClientCheck>>,
    /// What a client may take on this listener.
    pub limits: ClientLimits,
    /// This listener's access log.
    pub access_log: AccessLogConfig,
}

/// A certificate to serve, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// PEM chain file.
    pub cert: PathBuf,
    /// PEM key file.
    pub key: PathBuf,
    /// Names from the config; empty: take them from the certificate.
    pub names: Vec<String>,
    /// Served for an absent or unknown SNI name.
    pub default: bool,
    /// Where the config declares it, for messages.
    pub origin: String,
}

impl Config {
    /// The certificates every TLS listener serves: `[server.tls] cert`/`key` first, then each
    /// `[[server.tls.certificate]]`. Exactly one is the default (the one marked, else the first).
    pub fn certificates(&self) -> Vec<Certificate> {
        let Some(tls) = &self.server.tls else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            out.push(Certificate {
                cert: self.resolve_path(&cert.to_string_lossy()),
                key: self.resolve_path(&key.to_string_lossy()),
                names: Vec::new(),
                default: false,
                origin: "[server.tls]".into(),
            });
        }
        for (i, c) in tls.certificate.iter().enumerate() {
            let c = c.get_ref();
            out.push(Certificate {
                cert: self.resolve_path(&c.cert.to_string_lossy()),
                key: self.resolve_path(&c.key.to_string_lossy()),
                names: c.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                default: c.default,
                origin: format!("[[server.tls.certificate]] {}", i + 1),
            });
        }
        if !out.iter().any(|c| c.default) {
            if let Some(first) = out.first_mut() {
                first.default = true;
            }
        }
        out
    }

    /// Checks the TLS tables and every listener and resolves them (called once, at load).
    pub(crate) fn resolve_listeners(&self) -> Result<Vec<Listener>, ConfigError> {
        let server = &self.server;
        let tls = server.tls.as_ref();
        let tls_span = tls
            .and_then(|t| t.listen.first())
            .map_or(0..0, |l| l.span());
        if let Some(t) = tls {
            self.check_certificate_tables(t, tls_span.clone())?;
        }
        let has_certs = !self.certificates().is_empty();
        let tls_default = self
            .client_check(
                tls.and_then(|t| t.client_ca.as_ref()),
                tls.and_then(|t| t.client_auth),
                "[server.tls]",
            )
            .map_err(|m| self.error_at(tls_span.clone(), m))?;
        let need_certs = |span: std::ops::Range<usize>, what: &str| {
            if has_certs {
                Ok(())
            } else {
                Err(self.error_at(span, format!("{what} is a TLS listener but [server.tls] has no certificate; give [server.tls] cert and key, or add a [[server.tls.certificate]] with cert and key")))
            }
        };

        let mut out = Vec::new();
        let plain = match &server.listen {
            Some(l) => l.clone(),
            None if server.listener.is_empty() => default_listen(),
            None => Vec::new(),
        };
        let mut spans = Vec::new();
        for l in &plain {
            let addr = parse_listen(l.get_ref()).map_err(|m| self.error_at(l.span(), m))?;
            out.push(Listener {
                addr,
                tls: None,
                limits: server.limits,
                access_log: server.access_log.clone(),
            });
            spans.push(l.span());
        }
        for l in tls.iter().flat_map(|t| t.listen.iter()) {
            let addr = parse_listen(l.get_ref()).map_err(|m| self.error_at(l.span(), m))?;
            need_certs(l.span(), &format!("[server.tls] listen {addr}"))?;
            out.push(Listener {
                addr,
                tls: Some(tls_default.clone()),
                limits: server.limits,
                access_log: server.access_log.clone(),
            });
            spans.push(l.span());
        }
        let raw: toml::Table = toml::from_str(self.source_text()).unwrap_or_default();
        let section = |key: &str| {
            raw.get("server")
                .and_then(|s| s.get(key))
                .and_then(toml::Value::as_table)
                .cloned()
                .unwrap_or_default()
        };
        let (global_limits, global_log) = (section("limits"), section("access_log"));
        for lc in &server.listener {
            let span = lc.address.span();
            let addr =
                parse_listen(lc.address.get_ref()).map_err(|m| self.error_at(span.clone(), m))?;
            let what = format!("[[server.listener]] {addr}");
            let tls = if lc.tls {
                need_certs(span.clone(), &what)?;
                let ca = lc
                    .client_ca
                    .as_ref()
                    .or(tls.and_then(|t| t.client_ca.as_ref()));
                let auth = lc.client_auth.or(tls.and_then(|t| t.client_auth));
                Some(
                    self.client_check(ca, auth, &what)
                        .map_err(|m| self.error_at(span.clone(), m))?,
                )
            } else if lc.client_ca.is_some() || lc.client_auth.is_some() {
                return Err(self.error_at(span, format!("{what}: client_ca and client_auth need tls = true (client certificates are part of the TLS handshake)")));
            } else {
                None
            };
            let limits: ClientLimits = match &lc.limits {
                Some(t) => self.overridden(&global_limits, t, &format!("{what} limits"))?,
                None => server.limits,
            };
            if let Some(t) = &lc.limits {
                if t.get_ref().contains_key("rate_limit") {
                    return Err(self.error_at(t.span(), format!("{what} limits: rate_limit is one table for the whole server (clients are counted across listeners); set it in [server.limits]")));
                }
                limits
                    .check(&format!("{what} limits"))
                    .map_err(|m| self.error_at(t.span(), m))?;
            }
            let access_log = match &lc.access_log {
                Some(t) => self.overridden(&global_log, t, &format!("{what} access_log"))?,
                None => server.access_log.clone(),
            };
            out.push(Listener {
                addr,
                tls,
                limits,
                access_log,
            });
            spans.push(span);
        }

        if out.is_empty() {
            return Err(self.error_at(0..0, "[server] listen is empty and there is no TLS listener or [[server.listener]], so the proxy would accept nothing; add an address such as listen = [\"127.0.0.1:8080\"]"));
        }
        let admin = parse_listen(self.admin.listen.get_ref())
            .map_err(|m| self.error_at(self.admin.listen.span(), m))?;
        let mut seen = HashSet::new();
        for (l, span) in out.iter().zip(spans) {
            if l.addr == admin {
                return Err(self.error_at(span, format!("{} is both a proxy and the admin listen address; give [admin] listen another port", l.addr)));
            }
            if !seen.insert(l.addr) {
                return Err(self.error_at(
                    span,
                    format!(
                        "{} is listed twice in [server]; each listen address must be unique",
                        l.addr
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// `base` (a global table) with `over`'s keys replacing its own, read as `T`.
    fn overridden<T: DeserializeOwned>(
        &self,
        base: &toml::Table,
        over: &Spanned<toml::Table>,
        what: &str,
    ) -> Result<T, ConfigError> {
        let mut merged = base.clone();
        merged.extend(over.get_ref().clone());
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| {
                self.error_at(over.span(), format!("{what}: {}", e.message().trim()))
            })
    }

    fn client_check(
        &self,
        ca: Option<&PathBuf>,
        auth: Option<ClientAuth>,
        what: &str,
    ) -> Result<Option<ClientCheck>, String> {
        match (ca, auth) {
            (_, Some(ClientAuth::None)) | (None, None) => Ok(None),
            (None, Some(a)) => Err(format!("{what}: client_auth = \"{}\" needs client_ca, the PEM file of the CAs that sign client certificates", if a == ClientAuth::Required { "required" } else { "optional" })),
            (Some(ca), auth) => Ok(Some(ClientCheck {
                ca: self.resolve_path(&ca.to_string_lossy()),
                required: auth != Some(ClientAuth::Optional),
            })),
        }
    }

    fn check_certificate_tables(
        &self,
        t: &crate::config::TlsConfig,
        span: std::ops::Range<usize>,
    ) -> Result<(), ConfigError> {
        match (&t.cert, &t.key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(self.error_at(span, "[server.tls] has only one of cert and key; give both (the PEM certificate chain and its private key), or neither and use [[server.tls.certificate]]"));
            }
            _ => {}
        }
        let mut defaults = 0;
        let mut names = HashSet::new();
        for (i, c) in t.certificate.iter().enumerate() {
            let at = |m: String| {
                self.error_at(
                    c.span(),
                    format!("[[server.tls.certificate]] {}: {m}", i + 1),
                )
            };
            let cfg = c.get_ref();
            if cfg.default {
                defaults += 1;
                if defaults > 1 {
                    return Err(at(
                        "a second certificate has default = true; mark one only".into()
                    ));
                }
            }
            for n in &cfg.names {
                let n = n.to_ascii_lowercase();
                check_name(&n).map_err(&at)?;
                if !names.insert(n.clone()) {
                    return Err(at(format!("the name \"{n}\" is given to two certificates; each SNI name must choose one")));
                }
            }
        }
        Ok(())
    }
}

/// An SNI name a certificate may be configured for: DNS labels, optionally `*.` first.
fn check_name(n: &str) -> Result<(), String> {
    let rest = n.strip_prefix("*.").unwrap_or(n);
    let ok = !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("\"{n}\" is not a DNS name; write names like \"example.com\" or \"*.example.com\" (a wildcard covers one label)"))
    }
}

/// What changed between two configs that only a restart applies, one sentence each. TLS
/// certificates and client certificate checks are not here: a reload applies them.
pub fn restart_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let key = |l: &Listener| (l.addr, l.tls.is_some());
    let olds: Vec<_> = old.listeners().iter().map(key).collect();
    let news: Vec<_> = new.listeners().iter().map(key).collect();
    let describe = |v: Vec<String>| v.join(", ");
    let added = describe(
        news.iter()
            .filter(|k| !olds.contains(k))
            .map(|(a, tls)| format!("{a}{}", if *tls { " (TLS)" } else { "" }))
            .collect(),
    );
    let removed = describe(
        olds.iter()
            .filter(|k| !news.contains(k))
            .map(|(a, tls)| format!("{a}{}", if *tls { " (TLS)" } else { "" }))
            .collect(),
    );
    if !added.is_empty() || !removed.is_empty() {
        out.push(format!(
            "listeners changed (added: {}; removed: {}): pingora cannot open or close listeners in a running server, so the old set keeps serving; restart sluice to apply",
            if added.is_empty() { "none" } else { &added },
            if removed.is_empty() { "none" } else { &removed },
        ));
    }
    for n in new.listeners() {
        let Some(o) = old.listeners().iter().find(|o| key(o) == key(n)) else {
            continue;
        };
        if o.limits != n.limits {
            out.push(format!(
                "limits of listener {} changed; restart sluice to apply them",
                n.addr
            ));
        }
        if o.access_log != n.access_log {
            out.push(format!(
                "access_log of listener {} changed; restart sluice to apply it",
                n.addr
            ));
        }
    }
    let (o, n) = (&old.server, &new.server);
    for (changed, what) in [
        (o.threads != n.threads, "[server] threads"),
        (o.zone != n.zone, "[server] zone"),
        (o.h2c != n.h2c, "[server] h2c"),
        (o.http1 != n.http1, "[server] http1"),
        (o.forwarding != n.forwarding, "[server.forwarding]"),
        (
            old.admin.listen.get_ref() != new.admin.listen.get_ref(),
            "[admin] listen",
        ),
        (old.admin.token != new.admin.token, "[admin] token"),
        (
            old.admin.protect_reads != new.admin.protect_reads,
            "[admin] protect_reads",
        ),
    ] {
        if changed {
            out.push(format!("{what} changed; restart sluice to apply it"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const POOL: &str =
        "[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\"]\n[[route]]\npool = \"web\"\n";

    fn parse(server: &str) -> Result<Config, ConfigError> {
        Config::parse(
            &format!("{server}\n[admin]\nlisten = \"127.0.0.1:9900\"\n{POOL}"),
            "t.toml",
            Path::new("/etc/sluice"),
        )
    }

    fn err(server: &str) -> String {
        parse(server).unwrap_err().to_string()
    }

    #[test]
    fn the_old_forms_still_resolve() {
        let c = parse("[server]\nlisten = [\"127.0.0.1:1\"]\n[server.tls]\nlisten = [\"127.0.0.1:2\"]\ncert = \"c.pem\"\nkey = \"k.pem\"\n").unwrap();
        let l = c.listeners();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].addr.port(), l[0].tls.clone()), (1, None));
        assert_eq!((l[1].addr.port(), l[1].tls.clone()), (2, Some(None)));
        let certs = c.certificates();
        assert_eq!(certs.len(), 1);
        assert!(certs[0].default);
        assert_eq!(certs[0].cert, Path::new("/etc/sluice/c.pem"));
        // No [server] at all: the default plain listener.
        let c = parse("").unwrap();
        assert_eq!(c.listeners()[0].addr.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn the_rate_limit_is_per_server_not_per_listener() {
        let e = err("[[server.listener]]\naddress = \"127.0.0.1:3\"\nlimits = { rate_limit = { requests_per_second = 5 } }\n");
        assert!(e.contains("set it in [server.limits]"), "{e}");
        let c = parse("[server.limits]\nrate_limit = { requests_per_second = 5 }\n").unwrap();
        assert_eq!(c.server.limits.rate_limit.unwrap().burst(), 5);
        let e = err("[server.limits]\nrate_limit = { requests_per_second = 0 }\n");
        assert!(
            e.contains("requests_per_second is 0; allowed: 1 to 1000000"),
            "{e}"
        );
        assert!(!e.contains("[server.limits] [server.limits]"), "{e}");
    }

    #[test]
    fn listener_tables_replace_the_default_and_override_limits_and_log() {
        let c = parse(
            "[server]\n[server.limits]\nmax_body_bytes = 1000\nheader_timeout = \"5s\"\n[server.access_log]\nformat = \"json\"\npath = \"a.log\"\n\
             [[server.listener]]\naddress = \"127.0.0.1:3\"\nlimits = { max_body_bytes = 10 }\naccess_log = { format = \"off\" }\n\
             [[server.listener]]\naddress = \"127.0.0.1:4\"\n",
        )
        .unwrap();
        let l = c.listeners();
        assert_eq!(
            l.len(),
            2,
            "no default 127.0.0.1:8080 beside listener tables"
        );
        assert_eq!(l[0].limits.max_body_bytes, 10);
        assert_eq!(
            l[0].limits.header_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(l[0].access_log.format, crate::access_log::LogFormat::Off);
        assert_eq!(l[1].limits, c.server.limits);
        assert_eq!(l[1].access_log, c.server.access_log);
        assert_eq!(l[1].limits.max_body_bytes, 1000);
    }

    #[test]
    fn bad_listener_settings_are_refused_with_their_line() {
        let e = err("[server]\nlisten = []\n[[server.listener]]\naddress = \"127.0.0.1:3\"\nlimits = { max_body = 10 }\n");
        assert!(e.contains("t.toml:5:") && e.contains("max_body"), "{e}");
        let e = err("[server]\nlisten = []\n[[server.listener]]\naddress = \"127.0.0.1:3\"\nlimits = { max_header_bytes = 1 }\n");
        assert!(e.contains("max_header_bytes is 1; allowed: 1024"), "{e}");
        let e = err(
            "[server]\nlisten = []\n[[server.listener]]\naddress = \"127.0.0.1:3\"\ntls = true\n",
        );
        assert!(
            e.contains("t.toml:4:") && e.contains("has no certificate"),
            "{e}"
        );
        let e = err("[server]\nlisten = []\n[[server.listener]]\naddress = \"127.0.0.1:3\"\nclient_ca = \"ca.pem\"\n");
        assert!(e.contains("need tls = true"), "{e}");
        let e = err("[server]\nlisten = []\n[server.tls]\ncert = \"a\"\nkey = \"b\"\nclient_auth = \"required\"\n[[server.listener]]\naddress = \"127.0.0.1:3\"\ntls = true\n");
        assert!(e.contains("needs client_ca"), "{e}");
        let e = err("[server]\n[server.tls]\nlisten = [\"127.0.0.1:2\"]\ncert = \"a\"\n");
        assert!(e.contains("only one of cert and key"), "{e}");
        let e = err("[server]\n[server.tls]\n[[server.tls.certificate]]\ncert = \"a\"\nkey = \"b\"\ndefault = true\n[[server.tls.certificate]]\ncert = \"c\"\nkey = \"d\"\ndefault = true\n");
        assert!(
            e.contains("t.toml:7:") && e.contains("mark one only"),
            "{e}"
        );
        let e = err("[server]\n[server.tls]\n[[server.tls.certificate]]\ncert = \"a\"\nkey = \"b\"\nnames = [\"a b\"]\n");
        assert!(e.contains("not a DNS name"), "{e}");
        let e = err("[server]\n[server.tls]\n[[server.tls.certificate]]\ncert = \"a\"\nkey = \"b\"\nnames = [\"x.test\"]\n[[server.tls.certificate]]\ncert = \"c\"\nkey = \"d\"\nnames = [\"X.test\"]\n");
        assert!(e.contains("given to two certificates"), "{e}");
        let e = err("[server]\nlisten = [\"127.0.0.1:3\"]\n[[server.listener]]\naddress = \"127.0.0.1:3\"\n");
        assert!(e.contains("listed twice"), "{e}");
        let e = err("[server]\nlisten = []\n");
        assert!(e.contains("accept nothing"), "{e}");
    }

    #[test]
    fn client_checks_inherit_from_server_tls() {
        let c = parse("[server]\nlisten = []\n[server.tls]\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"ca.pem\"\nclient_auth = \"optional\"\n\
                       [[server.listener]]\naddress = \"127.0.0.1:3\"\ntls = true\n\
                       [[server.listener]]\naddress = \"127.0.0.1:4\"\ntls = true\nclient_auth = \"none\"\n\
                       [[server.listener]]\naddress = \"127.0.0.1:5\"\ntls = true\nclient_ca = \"other.pem\"\nclient_auth = \"required\"\n").unwrap();
        let l = c.listeners();
        let check = |i: usize| l[i].tls.clone().unwrap();
        assert_eq!(
            check(0),
            Some(ClientCheck {
                ca: "/etc/sluice/ca.pem".into(),
                required: false
            })
        );
        assert_eq!(check(1), None);
        assert_eq!(
            check(2),
            Some(ClientCheck {
                ca: "/etc/sluice/other.pem".into(),
                required: true
            })
        );
    }

    #[test]
    fn restart_changes_name_what_a_reload_cannot_apply() {
        let old = parse("[server]\nlisten = [\"127.0.0.1:1\"]\n").unwrap();
        let new = parse("[server]\nlisten = [\"127.0.0.1:1\"]\nh2c = true\n[server.limits]\nmax_body_bytes = 5\n[[server.listener]]\naddress = \"127.0.0.1:2\"\n").unwrap();
        let w = restart_changes(&old, &new).join("\n");
        assert!(w.contains("added: 127.0.0.1:2; removed: none"), "{w}");
        assert!(w.contains("limits of listener 127.0.0.1:1 changed"), "{w}");
        assert!(w.contains("[server] h2c changed"), "{w}");
        // Certificates and client CAs are reloaded, so they are not restart changes.
        let a = parse(
            "[server]\n[server.tls]\nlisten = [\"127.0.0.1:2\"]\ncert = \"a\"\nkey = \"b\"\n",
        )
        .unwrap();
        let b = parse("[server]\n[server.tls]\nlisten = [\"127.0.0.1:2\"]\ncert = \"c\"\nkey = \"d\"\nclient_ca = \"ca.pem\"\n").unwrap();
        assert_eq!(restart_changes(&a, &b), Vec::<String>::new());
    }
}
