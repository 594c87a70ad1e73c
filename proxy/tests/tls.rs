//! TLS termination and per-listener settings, with a real TLS client (rustls) on loopback:
//! certificates chosen by SNI with a default, swapped by a reload (API and SIGHUP) with no
//! restart and no failed request, a broken certificate refused on reload, client certificates
//! (mTLS) required or optional per listener, and listeners with their own limits and access log.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts any server certificate: these tests look at which one was served, not at trust.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn pem_chain(path: &Path) -> Vec<CertificateDer<'static>> {
    let text = std::fs::read(path).unwrap();
    pem_certs(&text)
}

/// The certificates of a PEM file (the base64 between the markers).
fn pem_certs(text: &[u8]) -> Vec<CertificateDer<'static>> {
    use base64::Engine;
    let text = String::from_utf8_lossy(text);
    text.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|b| {
            let b64: String = b
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            CertificateDer::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            )
        })
        .collect()
}

fn pem_key(path: &Path) -> PrivateKeyDer<'static> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).unwrap();
    let b64: String = text
        .split("-----BEGIN PRIVATE KEY-----")
        .nth(1)
        .and_then(|b| b.split("-----END PRIVATE KEY-----").next())
        .expect("a PKCS#8 key")
        .split_whitespace()
        .collect();
    PrivateKeyDer::Pkcs8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
            .into(),
    )
}

/// The common name of a DER certificate.
fn common_name(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    cn
}

/// One `GET path` over TLS to `addr` with SNI `sni` (none when `None`), presenting the client
/// certificate `client` (`dir/name.pem` + `.key`) if given. Returns the common name of the
/// certificate the server presented and the response status, or what failed.
fn tls_get(
    addr: SocketAddr,
    sni: Option<&str>,
    client: Option<(&Path, &str)>,
    path: &str,
) -> Result<(String, u16), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match client {
        Some((dir, name)) => builder
            .with_client_auth_cert(
                pem_chain(&dir.join(format!("{name}.pem"))),
                pem_key(&dir.join(format!("{name}.key"))),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    // rustls sends no SNI for an IP address.
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut failure = None;
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return Err(format!("no response ({failure:?}): {text:?}"));
    };
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no server certificate")?;
    Ok((common_name(leaf.as_ref()), status))
}

fn pool(b: &[(SocketAddr, Arc<DemoBackend>)]) -> String {
    format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(b)
    )
}

/// Replaces a file the way deployment tools do: write beside it, then rename over it.
fn replace(dir: &Path, from: &str, to: &str) {
    let tmp = dir.join(format!("{to}.tmp"));
    std::fs::copy(dir.join(from), &tmp).unwrap();
    std::fs::rename(tmp, dir.join(to)).unwrap();
}

fn reload(p: &Proxy) -> HttpResponse {
    p.admin_req("POST", "/api/reload", b"")
}

#[test]
fn sni_chooses_the_certificate_and_unknown_or_absent_names_get_the_default() {
    let b = backends(1);
    let dir = scratch_dir("tls-sni");
    test_ca(&dir, "ca");
    signed_cert(&dir, "ca", "d", "default.test", &["default.test"]);
    signed_cert(&dir, "ca", "a", "a.test", &["a.test"]);
    signed_cert(&dir, "ca", "b", "b.test", &["b.test", "www.b.test"]);
    signed_cert(&dir, "ca", "w", "wild.test", &["*.w.test"]);
    // No DNS name in it at all: chosen only by the names the config gives.
    signed_cert(&dir, "ca", "x", "explicit", &[]);
    let tls_addr = unique_addr();
    let p = Proxy::start_full(
        dir.clone(),
        &format!(
            "tls = {{ listen = [\"{tls_addr}\"], cert = \"d.pem\", key = \"d.key\", certificate = [\
             {{ cert = \"a.pem\", key = \"a.key\" }}, {{ cert = \"b.pem\", key = \"b.key\" }}, \
             {{ cert = \"w.pem\", key = \"w.key\" }}, \
             {{ cert = \"x.pem\", key = \"x.key\", names = [\"explicit.test\", \"*.explicit.test\"] }}] }}"
        ),
        &pool(&b),
    );
    for (sni, expect) in [
        (Some("a.test"), "a.test"),
        (Some("A.Test"), "a.test"),
        (Some("b.test"), "b.test"),
        (Some("www.b.test"), "b.test"),
        (Some("one.w.test"), "wild.test"),
        (Some("w.test"), "default.test"),
        (Some("two.one.w.test"), "default.test"),
        (Some("explicit.test"), "explicit"),
        (Some("sub.explicit.test"), "explicit"),
        (Some("unknown.test"), "default.test"),
        (None, "default.test"),
    ] {
        let (cn, status) = tls_get(tls_addr, sni, None, "/").unwrap();
        assert_eq!((cn.as_str(), status), (expect, 200), "SNI {sni:?}");
    }
    drop(p);
}

/// A reload with changed certificate files serves the new ones on the next handshake, from the
/// same process, while a client makes requests without a single failure; SIGHUP does the same.
#[test]
fn a_reload_swaps_certificates_without_a_restart_or_a_failed_request() {
    let b = backends(1);
    let dir = scratch_dir("tls-reload");
    test_ca(&dir, "ca");
    signed_cert(&dir, "ca", "v1", "v1", &["site.test"]);
    signed_cert(&dir, "ca", "v2", "v2", &["site.test"]);
    signed_cert(&dir, "ca", "v3", "v3", &["site.test"]);
    replace(&dir, "v1.pem", "site.pem");
    replace(&dir, "v1.key", "site.key");
    let tls_addr = unique_addr();
    let p = Proxy::start_full(
        dir.clone(),
        &format!("tls = {{ listen = [\"{tls_addr}\"], cert = \"site.pem\", key = \"site.key\" }}"),
        &pool(&b),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(sluice::cold_lock::ColdLock::new(Vec::<
        Result<String, String>,
    >::new()));
    let load = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            for _ in 0..5000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let r = tls_get(tls_addr, Some("site.test"), None, "/").and_then(|(cn, s)| {
                    if s == 200 {
                        Ok(cn)
                    } else {
                        Err(format!("status {s}"))
                    }
                });
                seen.lock().push(r);
            }
        })
    };
    let count = |cn: &str| {
        seen.lock()
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|c| c == cn))
            .count()
    };
    assert!(wait_for(Duration::from_secs(30), || count("v1") >= 10));

    replace(&dir, "v2.pem", "site.pem");
    replace(&dir, "v2.key", "site.key");
    let r = reload(&p);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("site.test: new certificate"),
        "{}",
        r.text()
    );
    assert!(
        wait_for(Duration::from_secs(30), || count("v2") >= 10),
        "the new certificate is not served"
    );

    replace(&dir, "v3.pem", "site.pem");
    replace(&dir, "v3.key", "site.key");
    p.signal("-HUP");
    assert!(
        wait_for(Duration::from_secs(30), || count("v3") >= 10),
        "SIGHUP did not swap the certificate"
    );
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let seen = seen.lock();
    let failures: Vec<_> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "requests failed across the reloads: {failures:?}"
    );
    // Each handshake got the set current at its start: v1, then v2, then v3, never back.
    let order: Vec<&str> = seen.iter().map(|r| r.as_ref().unwrap().as_str()).collect();
    let rank = |cn: &str| ["v1", "v2", "v3"].iter().position(|v| *v == cn).unwrap();
    assert!(
        order.windows(2).all(|w| rank(w[0]) <= rank(w[1])),
        "an old certificate came back"
    );
    // One process throughout: it came up once.
    assert_eq!(
        p.log().matches("all listeners are up").count(),
        1,
        "{}",
        p.log()
    );
}

#[test]
fn a_broken_certificate_on_reload_is_refused_and_the_old_one_keeps_serving() {
    let b = backends(1);
    let dir = scratch_dir("tls-bad-reload");
    test_ca(&dir, "ca");
    signed_cert(&dir, "ca", "good", "good", &["site.test"]);
    signed_cert(&dir, "ca", "other", "other", &["site.test"]);
    replace(&dir, "good.pem", "site.pem");
    replace(&dir, "good.key", "site.key");
    let tls_addr = unique_addr();
    let p = Proxy::start_full(
        dir.clone(),
        &format!("tls = {{ listen = [\"{tls_addr}\"], cert = \"site.pem\", key = \"site.key\" }}"),
        &pool(&b),
    );
    // The key of another certificate.
    replace(&dir, "other.key", "site.key");
    let r = reload(&p);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("does not fit the certificate"),
        "{}",
        r.text()
    );
    assert!(
        r.text().contains("the running certificates stay"),
        "{}",
        r.text()
    );
    assert_eq!(
        tls_get(tls_addr, Some("site.test"), None, "/").unwrap(),
        ("good".into(), 200)
    );
    // Not PEM at all.
    std::fs::write(dir.join("site.pem"), "not a certificate").unwrap();
    let r = reload(&p);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("no PEM certificate"), "{}", r.text());
    // A file that is gone.
    std::fs::remove_file(dir.join("site.pem")).unwrap();
    let r = reload(&p);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("site.pem"), "{}", r.text());
    assert_eq!(
        tls_get(tls_addr, Some("site.test"), None, "/").unwrap(),
        ("good".into(), 200)
    );
    assert!(p.metric("sluice_config_reloads_total{result=\"rejected\"}") >= 3.0);
}

#[test]
fn client_certificates_are_checked_per_listener() {
    let b = backends(1);
    let dir = scratch_dir("tls-mtls");
    test_ca(&dir, "ca");
    test_ca(&dir, "rogue");
    signed_cert(&dir, "ca", "server", "server", &["site.test"]);
    signed_cert(&dir, "ca", "alice", "alice", &[]);
    signed_cert(&dir, "rogue", "mallory", "mallory", &[]);
    let (required, optional, open) = (unique_addr(), unique_addr(), unique_addr());
    let p = Proxy::start_full(
        dir.clone(),
        &format!(
            "tls = {{ cert = \"server.pem\", key = \"server.key\", client_ca = \"ca.pem\" }}\n\
             [[server.listener]]\naddress = \"{required}\"\ntls = true\n\
             [[server.listener]]\naddress = \"{optional}\"\ntls = true\nclient_auth = \"optional\"\n\
             [[server.listener]]\naddress = \"{open}\"\ntls = true\nclient_auth = \"none\"\n"
        ),
        &pool(&b),
    );
    let get = |addr, client: Option<&str>| {
        tls_get(addr, Some("site.test"), client.map(|c| (&*dir, c)), "/")
    };
    // Required: only a certificate signed by the CA gets in.
    assert!(get(required, None).is_err(), "no certificate was let in");
    assert!(
        get(required, Some("mallory")).is_err(),
        "a certificate of another CA was let in"
    );
    assert_eq!(get(required, Some("alice")).unwrap().1, 200);
    // Optional: no certificate is fine, a bad one is not.
    assert_eq!(get(optional, None).unwrap().1, 200);
    assert!(
        get(optional, Some("mallory")).is_err(),
        "a certificate of another CA was let in"
    );
    assert_eq!(get(optional, Some("alice")).unwrap().1, 200);
    // None: not asked for.
    assert_eq!(get(open, None).unwrap().1, 200);

    // A reload can turn the check off on a listener without a restart.
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    std::fs::write(
        &p.config_path,
        text.replacen(
            &format!("address = \"{required}\"\ntls = true\n"),
            &format!("address = \"{required}\"\ntls = true\nclient_auth = \"none\"\n"),
            1,
        ),
    )
    .unwrap();
    let r = reload(&p);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("client certificate check turned off"),
        "{}",
        r.text()
    );
    assert_eq!(get(required, None).unwrap().1, 200);
}

#[test]
fn listeners_have_their_own_limits_and_access_log() {
    let b = backends(1);
    let dir = scratch_dir("listener-settings");
    let (small, quiet) = (unique_addr(), unique_addr());
    let p = Proxy::start_full(
        dir.clone(),
        &format!(
            "access_log = {{ format = \"json\", path = \"access.log\" }}\n\
             [[server.listener]]\naddress = \"{small}\"\nlimits = {{ max_body_bytes = 16, max_connections = 1 }}\n\
             access_log = {{ format = \"common\", path = \"small.log\" }}\n\
             [[server.listener]]\naddress = \"{quiet}\"\naccess_log = {{ format = \"off\" }}\n"
        ),
        &pool(&b),
    );
    let body = [b'x'; 100];
    // With `http1 = "pingora"` only the connection cap and the HTTP/2 idle timeout of
    // `[server.limits]` apply (docs/config.md), so the body limit is checked on the lean path only.
    if lean_engine() {
        let r = request(small, "POST", "/upload", &[], &body).unwrap();
        assert_eq!(r.status, 413, "the listener's body limit");
    }
    assert_eq!(
        request(p.listen, "POST", "/upload", &[], &body)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        request(quiet, "POST", "/upload", &[], &body)
            .unwrap()
            .status,
        200
    );

    // The listener's own cap: one connection at a time there, while the others take more.
    let mut held = TcpStream::connect(small).unwrap();
    held.write_all(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(held.read(&mut buf).unwrap() > 0);
    let mut extra = TcpStream::connect(small).unwrap();
    let _ = extra.write_all(b"GET /extra HTTP/1.1\r\nHost: x\r\n\r\n");
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(
        matches!(extra.read(&mut buf), Ok(0) | Err(_)),
        "a second connection was served over the listener's max_connections = 1"
    );
    let _more = TcpStream::connect(p.listen).unwrap();
    assert_eq!(p.get("/").status, 200, "other listeners are not capped");
    drop(held);

    // Access logs: the quiet listener writes none, the small one its own file.
    assert_eq!(
        request(quiet, "GET", "/on-quiet", &[], b"").unwrap().status,
        200
    );
    assert!(wait_for(Duration::from_secs(10), || request(
        small,
        "GET",
        "/on-small",
        &[],
        b""
    )
    .is_ok_and(|r| r.status == 200)));
    assert_eq!(p.get("/marker").status, 200);
    let main_log = || std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(10), || main_log().contains("/marker")),
        "the main listener's line is missing: {}",
        main_log()
    );
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(
            dir.join("small.log")
        )
        .is_ok_and(|l| l.contains("\"GET /on-small HTTP/1.1\" 200"))),
        "the small listener's line is missing"
    );
    // Lines are written in order by one writer, so the quiet request's would be before /marker.
    let main = main_log();
    assert!(
        !main.contains("/on-quiet"),
        "the quiet listener was logged: {main}"
    );
    assert!(
        !main.contains("/on-small"),
        "the small listener logged to the main file: {main}"
    );
}

/// A reload that changes settings only a restart applies says which, and keeps serving.
#[test]
fn a_reload_names_the_settings_that_need_a_restart() {
    let b = backends(1);
    let dir = scratch_dir("listener-restart");
    let p = Proxy::start_full(dir, "", &pool(&b));
    let added = unique_addr();
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    let text = text.replacen(
        "[admin]",
        &format!("h2c = true\nlimits = {{ max_body_bytes = 5 }}\n[[server.listener]]\naddress = \"{added}\"\n[admin]"),
        1,
    );
    std::fs::write(&p.config_path, text).unwrap();
    let r = reload(&p);
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.text();
    assert!(report.contains(&format!("added: {added}")), "{report}");
    assert!(report.contains("restart sluice to apply"), "{report}");
    assert!(report.contains("[server] h2c changed"), "{report}");
    assert!(
        report.contains(&format!("limits of listener {} changed", p.listen)),
        "{report}"
    );
    assert!(
        TcpStream::connect(added).is_err(),
        "a listener was opened without a restart"
    );
    assert!(p.log().contains("listeners changed"), "the log says it too");
    assert_eq!(p.get("/").status, 200);
}
