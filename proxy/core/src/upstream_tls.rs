//! How a pool speaks to its backends (`protocol`, `[pool.tls]`), loaded and checked once when the
//! pool is built: files read with a size bound, certificates and key parsed, the key matched to
//! its certificate, and the lean path's TLS client configuration built. A file that fails any of
//! this rejects the config (at `check`, at start, and on reload, where the old config stays).

use std::any::Any;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::{Config, PoolConfig, UpstreamProtocol, UpstreamTlsConfig};

/// Largest CA, certificate or key file read.
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// How a pool reaches its backends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Upstream {
    /// HTTP/1.1, h2 or h2c.
    pub protocol: UpstreamProtocol,
    /// TLS to the backends; always set for `h2`.
    pub tls: Option<Arc<UpstreamTls>>,
}

impl Upstream {
    /// Loads the pool's `protocol` and `[pool.tls]` (files relative to the config file).
    pub fn load(pool: &PoolConfig, config: &Config) -> Result<Upstream, String> {
        let name = pool.name.get_ref();
        let tls = match (&pool.tls, pool.protocol) {
            (Some(t), _) => Some(t.get_ref().clone()),
            // HTTP/2 to a backend is negotiated with TLS (ALPN): the defaults apply.
            (None, UpstreamProtocol::H2) => Some(UpstreamTlsConfig {
                sni: None,
                ca_file: None,
                client_cert: None,
                client_key: None,
                verify: None,
            }),
            (None, _) => None,
        };
        let tls = tls
            .map(|t| UpstreamTls::load(&t, pool.protocol, |p| config.resolve_path(p)))
            .transpose()
            .map_err(|m| format!("pool \"{name}\": [pool.tls] {m}"))?;
        if tls.as_ref().is_some_and(|t| !t.verify) {
            tracing::warn!(pool = %name, "[pool.tls] verify = false: backend certificates are NOT checked; anyone on the path to the backends can read and change this pool's traffic");
        }
        Ok(Upstream {
            protocol: pool.protocol,
            tls: tls.map(Arc::new),
        })
    }

    /// Separates connections that must not be shared: `0` for plain HTTP/1.1 (the common case),
    /// another value per protocol and TLS identity. Idle connections kept under one key are
    /// never handed to a request under another (a reload that changes the TLS settings, or two
    /// pools sharing a backend).
    pub fn conn_key(&self) -> u64 {
        match (&self.tls, self.protocol) {
            (Some(t), _) => t.id,
            (None, UpstreamProtocol::H2c) => 2,
            (None, _) => 0,
        }
    }
}

/// A pool's loaded TLS settings.
pub struct UpstreamTls {
    /// Sent as SNI and checked against the certificate; `None`: the backend's IP address is
    /// checked instead and no SNI is sent (SNI cannot carry an address).
    pub sni: Option<String>,
    /// Whether the backend's certificate is checked.
    pub verify: bool,
    /// The CA certificates of `ca_file`; `None`: the system's roots.
    pub ca: Option<Vec<CertificateDer<'static>>>,
    /// The client certificate chain (leaf first) and its key, DER.
    pub client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    /// The lean path's client configuration (HTTP/1.1 over TLS, ALPN `http/1.1`).
    pub http1: Arc<ClientConfig>,
    /// A digest of everything above, nonzero: equal settings give equal ids.
    pub id: u64,
    /// The same material in the pingora-proxy path's own types, built there on first use
    /// (this crate does not depend on pingora).
    pub engine_form: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .field("ca_certs", &self.ca.as_ref().map(Vec::len))
            .field("client_cert", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl UpstreamTls {
    /// Reads and checks the files `t` names; `resolve` makes a path absolute.
    pub fn load(
        t: &UpstreamTlsConfig,
        protocol: UpstreamProtocol,
        resolve: impl Fn(&str) -> PathBuf,
    ) -> Result<UpstreamTls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verify = t.verify.unwrap_or(true);
        let mut digest = Sha256::new();
        digest.update([protocol as u8, u8::from(verify)]);
        digest.update(t.sni.as_deref().unwrap_or("").as_bytes());
        digest.update([0]);

        let ca = match &t.ca_file {
            Some(path) => {
                let path = resolve(&path.to_string_lossy());
                let pem = read_pem(&path, "ca_file")?;
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("ca_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the CA certificate(s) that signed the backends' certificates", path.display()));
                }
                let mut store = RootCertStore::empty();
                for (i, c) in certs.iter().enumerate() {
                    store.add(c.clone()).map_err(|e| {
                        format!(
                            "ca_file {}: certificate {} cannot be a trust anchor: {e}",
                            path.display(),
                            i + 1
                        )
                    })?;
                    digest.update(c.as_ref());
                }
                Some(certs)
            }
            None => None,
        };
        digest.update([1]);

        let client = match (&t.client_cert, &t.client_key) {
            (Some(cert), Some(key)) => {
                let cert = resolve(&cert.to_string_lossy());
                let key = resolve(&key.to_string_lossy());
                let chain = CertificateDer::pem_slice_iter(&read_pem(&cert, "client_cert")?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("client_cert {}: {e}", cert.display()))?;
                if chain.is_empty() {
                    return Err(format!(
                        "client_cert {} holds no PEM certificate",
                        cert.display()
                    ));
                }
                let key_der = PrivateKeyDer::from_pem_slice(&read_pem(&key, "client_key")?)
                    .map_err(|e| {
                        format!(
                            "client_key {}: no PEM private key (PKCS#1, PKCS#8 or SEC1): {e}",
                            key.display()
                        )
                    })?;
                // pingora re-reads the key from its DER bytes when it connects; it must be a
                // form it recognises.
                if PrivateKeyDer::try_from(key_der.secret_der().to_vec()).is_err() {
                    return Err(format!(
                        "client_key {}: the key's format is not recognised",
                        key.display()
                    ));
                }
                // Checks that the key belongs to the certificate.
                ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(RootCertStore::empty())
                    .with_client_auth_cert(chain.clone(), key_der.clone_key())
                    .map_err(|e| {
                        format!(
                            "client_key {} does not fit client_cert {}: {e}",
                            key.display(),
                            cert.display()
                        )
                    })?;
                for c in &chain {
                    digest.update(c.as_ref());
                }
                Some((chain, key_der))
            }
            _ => None,
        };

        let roots = match &ca {
            Some(certs) => {
                let mut store = RootCertStore::empty();
                store.add_parsable_certificates(certs.iter().cloned());
                Arc::new(store)
            }
            None if verify => system_roots()?,
            None => Arc::new(RootCertStore::empty()),
        };
        let http1 = client_config(
            provider,
            roots,
            verify,
            client.as_ref(),
            vec![b"http/1.1".to_vec()],
        )?;
        let id = u64::from_be_bytes(digest.finalize()[..8].try_into().unwrap_or_default()) | 1;
        Ok(UpstreamTls {
            sni: t.sni.clone(),
            verify,
            ca,
            client,
            http1: Arc::new(http1),
            id,
            engine_form: OnceLock::new(),
        })
    }

    /// The name to connect to `ip` with: the configured SNI, or the address itself (verified
    /// against the certificate's IP addresses; rustls sends no SNI for it).
    pub fn server_name(&self, ip: IpAddr) -> ServerName<'static> {
        match &self.sni {
            Some(sni) => {
                ServerName::try_from(sni.clone()).unwrap_or(ServerName::IpAddress(ip.into()))
            }
            None => ServerName::IpAddress(ip.into()),
        }
    }
}

/// Reads a PEM file of at most [`MAX_PEM_FILE`] bytes.
fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let bad = |e: std::io::Error| {
        format!(
            "{what} {}: {e}; give the path of a PEM file (relative paths are relative to the config file)",
            path.display()
        )
    };
    let meta = std::fs::metadata(path).map_err(bad)?;
    if meta.len() > MAX_PEM_FILE {
        return Err(format!(
            "{what} {} is {} bytes; a PEM file over {MAX_PEM_FILE} bytes is not a certificate or key",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(bad)
}

/// The system's trust roots (as pingora's connector loads them: the platform store, or
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`), read once per process.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    if let Some(r) = ROOTS.get() {
        return Ok(r.clone());
    }
    let certs = rustls_native_certs::load_native_certs()
        .map_err(|e| format!("cannot read the system's CA certificates ({e}); give ca_file"))?;
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(certs);
    if store.is_empty() {
        return Err("the system has no CA certificates (install the ca-certificates package) and no ca_file is given".into());
    }
    Ok(ROOTS.get_or_init(|| Arc::new(store)).clone())
}

fn client_config(
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    verify: bool,
    client: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if verify {
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    };
    let mut config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn;
    Ok(config)
}

/// `verify = false`: any certificate is accepted (signatures over the handshake are still
/// checked, so the connection is encrypted to whoever holds the certificate's key).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
