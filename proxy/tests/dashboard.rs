//! The dashboard in a real headless Chromium: it renders pools, strategies and backends from the
//! admin API, and shows a hot swap.

mod common;

use std::process::Command;

use common::*;

/// The page's DOM after its scripts ran (Chromium's virtual time lets the fetches finish).
fn rendered(url: &str, tag: &str) -> String {
    let profile = scratch_dir(tag);
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
        ])
        .args([
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("Debian's chromium must be installed for this test (scripts/test installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dashboard_shows_pools_backends_and_swaps() {
    let b = backends(2);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("dashboard", &body);
    for _ in 0..4 {
        proxy.get("/");
    }
    let url = format!("http://{}/", proxy.admin);
    let dom = rendered(&url, "chromium-1");
    assert!(
        dom.contains("pool web — strategy builtin:round-robin (generation 1)"),
        "{dom}"
    );
    for (addr, _) in &b {
        assert!(
            dom.contains(&format!("<td>{addr}</td><td>routable</td>")),
            "{addr} missing in {dom}"
        );
    }
    // Two requests reached each backend: the 2xx column says so.
    assert_eq!(
        dom.matches("<td>2</td><td>0</td><td>0</td></tr>").count(),
        2,
        "{dom}"
    );

    assert_eq!(proxy.put_strategy("web", &first_only()).status, 200);
    let dom = rendered(&url, "chromium-2");
    assert!(dom.contains("strategy uploaded (generation 2)"), "{dom}");
}
