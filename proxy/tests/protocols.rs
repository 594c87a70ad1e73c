//! Downstream protocols with a real client (curl): TLS termination with HTTP/2 over ALPN, and
//! h2c (HTTP/2 prior knowledge) on the plain-text listener.

mod common;

use std::process::Command;

use common::*;

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, meta) = text.rsplit_once('\n').unwrap_or(("", ""));
    (body.trim().to_string(), meta.to_string())
}

#[test]
fn tls_with_h2_and_h2c() {
    let b = backends(2);
    let dir = scratch_dir("tls");
    self_signed(&dir, "cert.pem", "key.pem");
    let tls_addr = unique_addr();
    let server = format!(
        "h2c = true\ntls = {{ listen = [\"{tls_addr}\"], cert = \"cert.pem\", key = \"key.pem\" }}"
    );
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start_full(dir, &server, &body);

    let url = format!("https://{tls_addr}/");
    let (body1, meta) = curl(&["-k", "--http2", &url]);
    assert_eq!(meta, "2 200", "TLS + ALPN h2 ({body1})");
    let (body2, meta) = curl(&["-k", "--http1.1", &url]);
    assert_eq!(meta, "1.1 200");
    assert_ne!(body1, body2, "round-robin continues across protocols");

    let url = format!("http://{}/", proxy.listen);
    let (_, meta) = curl(&["--http2-prior-knowledge", &url]);
    assert_eq!(meta, "2 200", "h2c prior knowledge");
    let (_, meta) = curl(&[&url]);
    assert_eq!(meta, "1.1 200");
}

/// An HTTP→HTTPS redirect limited to plain-text connections (`scheme = "http"`): plain requests
/// are redirected with their path and query, TLS ones (HTTP/1.1 and h2) reach the pool instead
/// of being redirected to themselves.
#[test]
fn an_http_to_https_redirect_applies_to_plain_text_connections_only() {
    let b = backends(1);
    let dir = scratch_dir("https-redirect");
    self_signed(&dir, "cert.pem", "key.pem");
    let tls_addr = unique_addr();
    let server =
        format!("tls = {{ listen = [\"{tls_addr}\"], cert = \"cert.pem\", key = \"key.pem\" }}");
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n\
         [[route]]\nscheme = \"http\"\nredirect = {{ scheme = \"https\", status = 308 }}\n\
         [[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start_full(dir, &server, &body);

    let r = proxy.get("/a/b?q=1");
    assert_eq!(r.status, 308, "{}", r.text());
    let location = r.header("location").unwrap_or_default();
    assert!(
        location.starts_with("https://") && location.ends_with("/a/b?q=1"),
        "{location}"
    );
    let url = format!("https://{tls_addr}/a/b?q=1");
    for proto in ["--http1.1", "--http2"] {
        let (body, meta) = curl(&["-k", proto, &url]);
        assert!(meta.ends_with(" 200"), "{proto}: {meta} {body}");
        assert_eq!(body, "b1");
    }
    // A route's scheme must be one of the two.
    let bad = proxy.dir.join("bad.toml");
    let text = std::fs::read_to_string(&proxy.config_path)
        .unwrap()
        .replace("scheme = \"http\"\nredirect", "scheme = \"ftp\"\nredirect");
    std::fs::write(&bad, text).unwrap();
    let out = sluice_cli(&["check", "--config", bad.to_str().unwrap()]);
    assert!(
        !out.ok
            && out
                .stderr
                .contains("scheme = \"ftp\" is not \"http\" or \"https\""),
        "{}",
        out.stderr
    );
}
