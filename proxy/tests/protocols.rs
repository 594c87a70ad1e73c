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
