//! TLS termination: the certificates every TLS listener serves, chosen by SNI, and each
//! listener's client certificate check (mTLS). Both sit behind `ArcSwap`s that pingora's rustls
//! acceptor consults during each handshake (a certificate resolver and a client certificate
//! verifier installed with `TlsSettings::set_cert_resolver` / `set_client_cert_verifier`), so a
//! reload replaces certificates and CAs without reopening a listener: handshakes in flight finish
//! with what they started with, the next one gets the new set.
//!
//! Everything is read and checked before anything is swapped: a broken certificate on reload is
//! refused with the reason and the old ones keep serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use pingora::listeners::tls::TlsSettings;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::config::Config;
use crate::listener::{Certificate, ClientCheck};
use crate::runtime::{ReloadHook, ReloadReport};

/// Largest certificate, key or CA file read.
const MAX_PEM_FILE: u64 = 1 << 20;

/// The crypto provider rustls uses (pingora installs ring as the process default).
fn provider() -> Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .expect("a default crypto provider was just installed")
}

fn check_size(path: &Path, what: &str, origin: &str) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| {
        anyhow::anyhow!(
            "{origin} {what} {}: {e}; give the path of a PEM file (relative paths are relative to the config file)",
            path.display()
        )
    })?;
    anyhow::ensure!(
        meta.len() <= MAX_PEM_FILE,
        "{origin} {what} {} is {} bytes; a PEM file over {MAX_PEM_FILE} bytes is not a certificate or key",
        path.display(),
        meta.len()
    );
    Ok(())
}

/// The certificates, by SNI name.
struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    default_name: String,
    /// What each configured certificate is, for the admin API.
    info: Vec<CertInfo>,
}

/// A certificate being served, as the admin API and dashboard show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// Where the config declares it.
    pub origin: String,
    /// The certificate file.
    pub cert: String,
    /// The SNI names it is served for.
    pub names: Vec<String>,
    /// Served for an absent or unknown SNI name.
    pub default: bool,
    /// The leaf's notAfter, Unix milliseconds.
    pub not_after_unix_ms: i64,
}

impl CertSet {
    /// The certificate for `sni` (already lower case: rustls lowercases it).
    fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        if let Some(c) = self.exact.get(name) {
            return c;
        }
        // A wildcard covers exactly one label (RFC 6125 6.4.3).
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }

    /// Every configured name with the leaf certificate it serves.
    fn names(&self) -> HashMap<String, &[u8]> {
        fn leaf(c: &Arc<CertifiedKey>) -> &[u8] {
            c.cert.first().map_or(&[][..], |d| d.as_ref())
        }
        let mut out: HashMap<String, &[u8]> = self
            .exact
            .iter()
            .map(|(n, c)| (n.clone(), leaf(c)))
            .collect();
        out.extend(
            self.wildcard
                .iter()
                .map(|(n, c)| (format!("*.{n}"), leaf(c))),
        );
        out
    }

    /// Reads and checks every certificate of `certs` (`None` when there are none).
    fn load(certs: &[Certificate]) -> anyhow::Result<Option<CertSet>> {
        let provider = provider();
        let mut set: Option<CertSet> = None;
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut owner: HashMap<String, &str> = HashMap::new();
        let mut info = Vec::new();
        for c in certs {
            let origin = c.origin.as_str();
            check_size(&c.cert, "cert", origin)?;
            check_size(&c.key, "key", origin)?;
            let (chain, key) = pingora::tls::load_certs_and_key_files(
                &c.cert.to_string_lossy(),
                &c.key.to_string_lossy(),
            )
            .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{origin}: {} holds no PEM certificate or {} no PEM private key (PKCS#1, PKCS#8 or SEC1)",
                    c.cert.display(),
                    c.key.display()
                )
            })?;
            let names = if c.names.is_empty() {
                names_in(&chain[0]).map_err(|e| {
                    anyhow::anyhow!("{origin}: cannot read {}: {e}", c.cert.display())
                })?
            } else {
                c.names.clone()
            };
            let not_after = not_after(&chain[0])
                .map_err(|e| anyhow::anyhow!("{origin}: cannot read {}: {e}", c.cert.display()))?;
            info.push(CertInfo {
                origin: origin.to_string(),
                cert: c.cert.display().to_string(),
                names: names.clone(),
                default: c.default,
                not_after_unix_ms: not_after.saturating_mul(1000),
            });
            let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                anyhow::anyhow!(
                    "{origin}: the key {} does not fit the certificate {}: {e}",
                    c.key.display(),
                    c.cert.display()
                )
            })?;
            anyhow::ensure!(
                !names.is_empty() || c.default,
                "{origin}: {} names no DNS host (no DNS subject alternative name, no common name), so no SNI name would choose it; give names = [\"...\"]",
                c.cert.display()
            );
            let key = Arc::new(key);
            for n in &names {
                if let Some(other) = owner.insert(n.clone(), origin) {
                    anyhow::bail!(
                        "{origin}: the name {n} is also served by {other}; each SNI name must choose one certificate (set names = [...] on the entries to say which)"
                    );
                }
                match n.strip_prefix("*.") {
                    Some(parent) => wildcard.insert(parent.to_string(), key.clone()),
                    None => exact.insert(n.clone(), key.clone()),
                };
            }
            if c.default {
                set = Some(CertSet {
                    exact: HashMap::new(),
                    wildcard: HashMap::new(),
                    default: key,
                    default_name: names.first().cloned().unwrap_or_else(|| origin.to_string()),
                    info: Vec::new(),
                });
            }
        }
        Ok(set.map(|s| CertSet {
            exact,
            wildcard,
            info,
            ..s
        }))
    }
}

/// The DNS names a leaf certificate is for: its DNS subject alternative names, or its common
/// name when it has none (lower case).
fn names_in(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("not an X.509 certificate ({e})"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok());
        names.extend(cn.map(str::to_ascii_lowercase));
    }
    Ok(names)
}

/// The end of a leaf certificate's validity, Unix seconds.
fn not_after(leaf: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("not an X.509 certificate ({e})"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The certificate resolver of every TLS listener: picks by SNI from the current set.
pub struct CertStore(ArcSwap<CertSet>);

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().pick(hello.server_name()).clone())
    }
}

/// The verifier a listener asks for client certificates with (`None`: no client certificates).
struct Verifier(Arc<dyn ClientCertVerifier>);

/// A TLS listener's client certificate check, replaceable on reload. It delegates to rustls's
/// `WebPkiClientVerifier` built for the listener's CA and policy.
///
/// It names no acceptable CAs in its certificate request (RFC 8446 4.2.4 makes the list
/// optional): the list would have to be borrowed from a verifier a reload may drop, and clients
/// then offer the certificate they have.
pub struct ClientCheckSwitch(ArcSwapOption<Verifier>);

impl std::fmt::Debug for ClientCheckSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCheckSwitch").finish_non_exhaustive()
    }
}

impl ClientCheckSwitch {
    fn load(check: Option<&ClientCheck>, origin: &str) -> anyhow::Result<Option<Verifier>> {
        let Some(check) = check else {
            return Ok(None);
        };
        check_size(&check.ca, "client_ca", origin)?;
        let mut roots = RootCertStore::empty();
        pingora::tls::load_ca_file_into_store(&check.ca, &mut roots)
            .map_err(|e| anyhow::anyhow!("{origin} client_ca {}: {e}", check.ca.display()))?;
        anyhow::ensure!(
            !roots.is_empty(),
            "{origin} client_ca {} holds no PEM certificate; give the CA certificates that sign client certificates",
            check.ca.display()
        );
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        let builder = if check.required {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        let v = builder
            .build()
            .map_err(|e| anyhow::anyhow!("{origin} client_ca {}: {e}", check.ca.display()))?;
        Ok(Some(Verifier(v)))
    }
}

impl ClientCertVerifier for ClientCheckSwitch {
    fn offer_client_auth(&self) -> bool {
        self.0
            .load()
            .as_ref()
            .is_some_and(|v| v.0.offer_client_auth())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0
            .load()
            .as_ref()
            .is_some_and(|v| v.0.client_auth_mandatory())
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.0.load().as_ref() {
            Some(v) => v.0.verify_client_cert(end_entity, intermediates, now),
            // A reload turned client certificates off during this handshake.
            None => Err(rustls::Error::General(
                "client certificates are not accepted on this listener".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS state of the running proxy: the certificates and each TLS listener's client check
/// (cheap to clone: the clones share them).
#[derive(Clone)]
pub struct Tls {
    certs: Arc<CertStore>,
    clients: HashMap<SocketAddr, Arc<ClientCheckSwitch>>,
}

/// What a config asks for, read and checked.
struct Loaded {
    certs: Option<CertSet>,
    clients: Vec<(SocketAddr, Option<Verifier>)>,
}

fn load(config: &Config) -> anyhow::Result<Loaded> {
    let certs = CertSet::load(&config.certificates())?;
    let clients = config
        .listeners()
        .iter()
        .filter_map(|l| Some((l.addr, l.tls.as_ref()?)))
        .map(|(addr, check)| {
            let origin = format!("listener {addr}:");
            Ok((addr, ClientCheckSwitch::load(check.as_ref(), &origin)?))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Loaded { certs, clients })
}

/// Reads and checks every certificate, key and client CA `config` names (for `sluice check` and
/// before `run` opens anything).
pub fn check(config: &Config) -> anyhow::Result<()> {
    load(config).map(|_| ())
}

impl Tls {
    /// Loads what `config` asks for, or `None` when it has no TLS listener.
    pub fn start(config: &Config) -> anyhow::Result<Option<Tls>> {
        if !config.listeners().iter().any(|l| l.tls.is_some()) {
            return Ok(None);
        }
        let loaded = load(config)?;
        let certs = loaded
            .certs
            .ok_or_else(|| anyhow::anyhow!("TLS listeners need a certificate in [server.tls]"))?;
        Ok(Some(Tls {
            certs: Arc::new(CertStore(ArcSwap::from_pointee(certs))),
            clients: loaded
                .clients
                .into_iter()
                .map(|(a, v)| {
                    (
                        a,
                        Arc::new(ClientCheckSwitch(ArcSwapOption::from_pointee(v))),
                    )
                })
                .collect(),
        }))
    }

    /// The certificates served now (after the last reload), in config order.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.certs.0.load().info.clone()
    }

    /// pingora's settings for the TLS listener on `addr` (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn settings(&self, addr: SocketAddr) -> anyhow::Result<TlsSettings> {
        // No files: with a resolver set, pingora ignores the certificate paths. The handshake
        // callback records the client's SNI name for the access log.
        let mut s = TlsSettings::with_callbacks(Box::new(crate::tls_name::RecordServerName))
            .map_err(|e| anyhow::anyhow!("TLS settings for {addr}: {e}"))?;
        s.set_cert_resolver(self.certs.clone());
        if let Some(c) = self.clients.get(&addr) {
            s.set_client_cert_verifier(c.clone());
        }
        s.enable_h2();
        Ok(s)
    }
}

impl ReloadHook for Tls {
    fn prepare(&self, cfg: &Config) -> Result<Box<dyn FnOnce(&mut ReloadReport) + Send>, String> {
        let loaded = load(cfg).map_err(|e| format!("{e:#}; the running certificates stay"))?;
        let tls = self.clone();
        Ok(Box::new(move |report: &mut ReloadReport| {
            if let Some(new) = loaded.certs {
                let old = tls.certs.0.load_full();
                report.tls.extend(describe_changes(&old, &new));
                tls.certs.0.store(Arc::new(new));
            }
            for (addr, verifier) in loaded.clients {
                // A TLS listener that is not running yet needs a restart (reported apart).
                if let Some(switch) = tls.clients.get(&addr) {
                    let was = switch.0.load().is_some();
                    if was || verifier.is_some() {
                        report.tls.push(format!(
                            "listener {addr}: client certificate check {}",
                            if verifier.is_some() {
                                "loaded"
                            } else {
                                "turned off"
                            }
                        ));
                    }
                    switch.0.store(verifier.map(Arc::new));
                }
            }
        }))
    }
}

/// One line per SNI name added, removed or given another certificate, and for a new default.
fn describe_changes(old: &CertSet, new: &CertSet) -> Vec<String> {
    let (o, n) = (old.names(), new.names());
    let mut out = Vec::new();
    for (name, leaf) in &n {
        match o.get(name) {
            None => out.push(format!("{name}: added")),
            Some(l) if l != leaf => out.push(format!("{name}: new certificate")),
            Some(_) => {}
        }
    }
    out.extend(
        o.keys()
            .filter(|k| !n.contains_key(*k))
            .map(|k| format!("{k}: removed")),
    );
    if old.default.cert != new.default.cert {
        out.push(format!("default: {}", new.default_name));
    }
    out.sort();
    out
}

/// The reload hook of a proxy without TLS listeners: certificates are only checked (a new TLS
/// listener needs a restart, which would load them).
pub struct CheckOnly;

impl ReloadHook for CheckOnly {
    fn prepare(&self, cfg: &Config) -> Result<Box<dyn FnOnce(&mut ReloadReport) + Send>, String> {
        check(cfg).map_err(|e| format!("{e:#}"))?;
        Ok(Box::new(|_: &mut ReloadReport| {}))
    }
}
