//! The dashboard in a real headless Chromium: it renders pools, strategies and backends from the
//! admin API and shows a hot swap; an operator drains a backend and uploads a plugin through the
//! page with the token entered once; a clustered proxy shows its members and map.

mod browser;
mod common;

use std::process::Command;
use std::time::Duration;

use browser::Browser;
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

const TOKEN: &str = "dash-board-token";

/// Generous: the page polls every 2 s and this machine may be busy.
const PAGE_LIMIT: Duration = Duration::from_secs(20);

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
            dom.contains(&format!(
                "<td>{addr}</td><td class=\"state state-routable\">routable</td>"
            )),
            "{addr} missing in {dom}"
        );
    }
    // Two requests reached each backend: the 2xx column says so (then 5xx, errors, ejection).
    assert_eq!(
        dom.matches("<td>2</td><td>0</td><td>0</td><td></td>")
            .count(),
        2,
        "{dom}"
    );
    // Routes and listeners come from /api/overview; no TLS listener, so no certificate.
    assert!(dom.contains("<td>pool web</td>"), "{dom}");
    assert!(
        dom.contains(&format!("<td>{}</td><td>plain</td>", proxy.listen)),
        "{dom}"
    );
    assert!(dom.contains("no TLS listener"), "{dom}");
    // The first version is in the swap history.
    assert!(dom.contains("loaded</span>"), "{dom}");

    assert_eq!(proxy.put_strategy("web", &first_only()).status, 200);
    // A refused reload is shown with its reason, until a later one is applied.
    proxy.rewrite_pools(&body.replace("[[route]]", "bogus = 1\n[[route]]"));
    assert_eq!(proxy.admin_req("POST", "/api/reload", b"").status, 422);
    let dom = rendered(&url, "chromium-2");
    assert!(dom.contains("strategy uploaded (generation 2)"), "{dom}");
    assert!(dom.contains("swapped</span>"), "{dom}");
    assert!(
        dom.contains("<span id=\"last-reload\" class=\"rejected\">last reload rejected at "),
        "{dom}"
    );
    assert!(
        dom.contains("the running config stays: ") && dom.contains("unknown field `bogus`"),
        "{dom}"
    );
}

/// The text of the state cell of `addr`'s row, as a JavaScript expression.
fn state_cell(addr: &str) -> String {
    format!("document.querySelector('tr[data-addr=\"{addr}\"] td:nth-child(2)')?.textContent")
}

#[test]
fn an_operator_drains_a_backend_and_uploads_a_plugin_through_the_page() {
    let b = backends(2);
    let body = format!(
        "token = \"{TOKEN}\"\n[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("dashboard-actions", &body);
    // Traffic for the charts: /api/history shows it within a few samples.
    assert!(
        wait_for(Duration::from_secs(10), || {
            for _ in 0..10 {
                proxy.get("/");
            }
            let h: serde_json::Value =
                serde_json::from_str(&proxy.admin_req("GET", "/api/history", b"").text()).unwrap();
            h["pools"][0]["rps"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x.as_f64().is_some_and(|r| r > 0.0)))
        }),
        "the history never showed the traffic"
    );
    let addr = b[0].0.to_string();
    let dir = scratch_dir("chromium-actions");
    let mut page = Browser::open(&format!("http://{}/", proxy.admin), &dir.join("profile"));
    assert!(
        page.wait_until(&format!("{} === 'routable'", state_cell(&addr)), PAGE_LIMIT),
        "the backend row never showed up"
    );
    // A chart per metric for the pool (drawn after the table), with a legend naming each backend.
    assert!(page.wait_until(
        "document.querySelectorAll('.pool-charts[data-pool=\"web\"] canvas').length === 4",
        PAGE_LIMIT
    ));
    assert!(page
        .eval("document.querySelector('.pool-charts .legend').textContent")
        .as_str()
        .unwrap()
        .contains(&addr));

    // Without the token, the API's refusal is shown and nothing changes.
    let drain = format!("tr[data-addr=\"{addr}\"] button[data-action=\"drain\"]");
    page.click(&drain);
    assert!(
        page.wait_until(
            "document.getElementById('message').textContent.includes('401')",
            PAGE_LIMIT
        ),
        "the refusal was not shown: {}",
        page.eval("document.getElementById('message').textContent")
    );
    assert_eq!(backend_field(&proxy, &addr, "admin_mode"), "active");

    // The token, entered once, and the same click drains the backend.
    page.type_into("#token", TOKEN);
    page.click("#token-save");
    assert!(page.wait_until("!document.getElementById('token-set').hidden", PAGE_LIMIT));
    page.click(&drain);
    assert!(
        page.wait_until(&format!("{} === 'drained'", state_cell(&addr)), PAGE_LIMIT),
        "the page never showed the drain: {}",
        page.eval("document.getElementById('message').textContent")
    );
    assert_eq!(backend_field(&proxy, &addr, "admin_mode"), "draining");
    assert_eq!(backend_field(&proxy, &addr, "state"), "drained");
    assert_eq!(
        page.eval(&format!("document.querySelector('{drain}').textContent")),
        "undrain"
    );

    // A plugin uploaded with its config through the file input.
    let wasm = dir.join("first-only.wasm");
    std::fs::write(&wasm, first_only()).unwrap();
    page.choose_file(".pool[data-pool=\"web\"] input[type=file]", &wasm);
    page.type_into(
        ".pool[data-pool=\"web\"] textarea",
        "{\"note\": \"from the page\"}",
    );
    page.click(".pool[data-pool=\"web\"] form.upload button");
    assert!(
        page.wait_until(
            "document.querySelector('.pool[data-pool=\"web\"] h2').textContent.includes('(generation 2)')",
            PAGE_LIMIT
        ),
        "the upload never showed: {}",
        page.eval("document.getElementById('message').textContent")
    );
    let pools = pools_json(&proxy);
    assert_eq!(pools["pools"][0]["strategy"]["generation"], 2);
    assert_eq!(pools["pools"][0]["strategy"]["name"], "uploaded");

    // A config that is not an object is refused in the page, before any upload.
    page.choose_file(".pool[data-pool=\"web\"] input[type=file]", &wasm);
    page.eval("document.querySelector('.pool[data-pool=\"web\"] textarea').value = ''");
    page.type_into(".pool[data-pool=\"web\"] textarea", "[1, 2]");
    page.click(".pool[data-pool=\"web\"] form.upload button");
    assert!(page.wait_until(
        "document.getElementById('message').textContent.includes('must be a JSON object')",
        PAGE_LIMIT
    ));
    assert_eq!(pools_json(&proxy)["pools"][0]["strategy"]["generation"], 2);

    // A file that is not a plugin: the API's reason is shown and kept in the swap history.
    let junk = dir.join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    page.choose_file(".pool[data-pool=\"web\"] input[type=file]", &junk);
    page.eval("document.querySelector('.pool[data-pool=\"web\"] textarea').value = ''");
    page.click(".pool[data-pool=\"web\"] form.upload button");
    assert!(
        page.wait_until(
            "document.getElementById('message').textContent.includes('not a valid WebAssembly module')",
            PAGE_LIMIT
        ),
        "{}",
        page.eval("document.getElementById('message').textContent")
    );
    assert!(page.wait_until(
        "document.querySelector('.pool[data-pool=\"web\"] table.swaps').textContent.includes('rejected')",
        PAGE_LIMIT
    ));
    let swaps = pools_json(&proxy)["pools"][0]["strategy"]["swaps"].clone();
    let results: Vec<&str> = swaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["loaded", "swapped", "rejected"], "{swaps}");

    // Weight and disable on the other backend.
    let other = b[1].0.to_string();
    let row = format!("tr[data-addr=\"{other}\"]");
    page.type_into(&format!("{row} input.weight"), "5");
    page.click(&format!("{row} button[data-action=\"weight\"]"));
    assert!(wait_for(PAGE_LIMIT, || backend_field(
        &proxy,
        &other,
        "weight_override"
    ) == 5));
    // The row changes width when the page shows it: wait, so the next click lands where aimed.
    assert!(page.wait_until(
        &format!(
            "document.querySelector('{row} td:nth-child(4)').textContent.startsWith('5 (set')"
        ),
        PAGE_LIMIT
    ));
    page.click(&format!("{row} button[data-action=\"disable\"]"));
    assert!(page.wait_until(
        &format!("{} === 'disabled'", state_cell(&other)),
        PAGE_LIMIT
    ));
    assert_eq!(backend_field(&proxy, &other, "admin_mode"), "disabled");
    page.click(&format!("{row} button[data-action=\"disable\"]")); // now labelled "enable"
    assert!(page.wait_until(
        &format!("{} === 'routable'", state_cell(&other)),
        PAGE_LIMIT
    ));

    // Reload: a backend added to the file appears in the page.
    let added = backends(1);
    proxy.rewrite_pools(&format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}, {}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b),
        backend_list(&added)
    ));
    page.click("#reload");
    assert!(
        page.wait_until(
            &format!("{} === 'routable'", state_cell(&added[0].0.to_string())),
            PAGE_LIMIT
        ),
        "{}",
        page.eval("document.getElementById('message').textContent")
    );
    assert!(page
        .eval("document.getElementById('message').textContent")
        .as_str()
        .unwrap()
        .contains("config reloaded (changed: web)"));

    // Not clustered: the page never asked for /api/cluster (it would be 404).
    let fetched = page.eval("performance.getEntriesByType('resource').map(e => e.name).join(' ')");
    let fetched = fetched.as_str().unwrap();
    assert!(fetched.contains("/api/pools"), "{fetched}");
    assert!(!fetched.contains("/api/cluster"), "{fetched}");

    let png = page.screenshot();
    let shot = dir.join("dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    let saved = std::fs::read(&shot).unwrap();
    assert!(saved.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        saved.len() > 20_000,
        "a near-empty screenshot: {} bytes",
        saved.len()
    );
}

#[test]
fn a_clustered_proxy_shows_its_members_and_map() {
    let b = backends(1);
    let dir = scratch_dir("dashboard-cluster");
    let g1 = gossip_addr(41);
    let proxy_dir = dir.sub("proxy");
    let proxy = Proxy::start_in(
        proxy_dir,
        &format!(
            "[[pool]]\nname = \"web\"\n[[route]]\npool = \"web\"\n{}",
            cluster_section("proxy-1", g1, CLUSTER_KEY, &[])
        ),
    );
    let _agent = Agent::start(
        &dir,
        "agent-1",
        &cluster_section("agent-1", gossip_addr(42), CLUSTER_KEY, &[g1]),
        b[0].0,
    );
    assert!(
        wait_for(Duration::from_secs(30), || routable(&proxy) == 1),
        "the agent's service never joined the pool"
    );
    let mut page = Browser::open(&format!("http://{}/", proxy.admin), &dir.join("profile"));
    assert!(
        page.wait_until(
            "document.querySelectorAll('#cluster-map svg g.member').length === 2",
            PAGE_LIMIT
        ),
        "no cluster map: {}",
        page.eval("document.getElementById('cluster-section').outerHTML")
    );
    let members = page.eval("document.querySelector('#cluster table.members').textContent");
    let members = members.as_str().unwrap();
    assert!(
        members.contains("proxy-1 (this proxy)") && members.contains("agent-1"),
        "{members}"
    );
    assert!(members.contains(&format!("web={}", b[0].0)), "{members}");
    // The map links the proxy to the agent's service, labelled with its pool.
    assert_eq!(
        page.eval("[...document.querySelectorAll('#cluster-map svg text')].some(t => t.textContent === 'web')"),
        true
    );
    assert_eq!(
        page.eval("document.querySelectorAll('#cluster-map svg line').length"),
        1
    );
    let png = page.screenshot();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000);
    std::fs::write(dir.join("cluster.png"), png).unwrap();

    // On a clustered proxy a plugin can be rolled out to every proxy from the page: the page
    // shows each proxy's result, and the proxy runs the plugin.
    let wasm = dir.join("first-only.wasm");
    std::fs::write(&wasm, first_only()).unwrap();
    page.choose_file(".pool[data-pool=\"web\"] input[type=file]", &wasm);
    page.click(".pool[data-pool=\"web\"] form.upload input[name=cluster]");
    page.click(".pool[data-pool=\"web\"] form.upload button");
    assert!(
        page.wait_until(
            "document.getElementById('message').textContent.includes('proxy-1: ok')",
            PAGE_LIMIT
        ),
        "the cluster rollout never showed: {}",
        page.eval("document.getElementById('message').textContent")
    );
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(first_only()))
    };
    assert!(
        wait_for(Duration::from_secs(10), || pools_json(&proxy)["pools"][0]
            ["strategy"]["sha256"]
            == sha.as_str()),
        "the rolled-out plugin is not running"
    );
}

#[test]
fn tls_listeners_and_certificate_expiry_are_shown() {
    let b = backends(1);
    let dir = scratch_dir("dashboard-tls");
    self_signed(&dir, "site.pem", "site.key"); // valid for one day
    let tls_addr = unique_addr();
    let proxy = Proxy::start_full(
        dir.clone(),
        &format!("tls = {{ listen = [\"{tls_addr}\"], cert = \"site.pem\", key = \"site.key\" }}"),
        &format!(
            "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
            backend_list(&b)
        ),
    );
    let o: serde_json::Value =
        serde_json::from_str(&proxy.admin_req("GET", "/api/overview", b"").text()).unwrap();
    let cert = &o["certificates"][0];
    assert_eq!(cert["names"], serde_json::json!(["localhost"]), "{o}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let not_after = cert["not_after_unix_ms"].as_i64().unwrap();
    assert!(
        now < not_after && not_after <= now + 2 * 86_400_000,
        "a one-day certificate ends within two days: {o}"
    );
    let listeners = o["listeners"].as_array().unwrap();
    assert!(
        listeners
            .iter()
            .any(|l| l["address"] == tls_addr.to_string() && l["tls"] == true),
        "{o}"
    );

    let dom = rendered(&format!("http://{}/", proxy.admin), "chromium-tls");
    assert!(
        dom.contains(&format!("<td>{tls_addr}</td><td>TLS</td>")),
        "{dom}"
    );
    // Under two weeks left: flagged.
    assert!(
        dom.contains("<td>localhost (default)</td>")
            && dom.contains("<span class=\"state state-expiring\">expiring</span>"),
        "{dom}"
    );
}

#[test]
fn health_states_and_timers_are_shown() {
    let b = backends(1);
    let down = unique_addr(); // nothing listens there
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}, \"{down}\"]\n\
         health = {{ plugin = \"builtin:tcp\", interval = \"200ms\", jitter = \"10ms\", timeout = \"300ms\", rise = 1, fall = 1 }}\n\
         [[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("dashboard-health", &body);
    let down = down.to_string();
    assert!(wait_for(Duration::from_secs(10), || backend_field(
        &proxy, &down, "state"
    ) == "unhealthy"));
    let dom = rendered(&format!("http://{}/", proxy.admin), "chromium-health");
    assert!(
        dom.contains(&format!(
            "<td>{down}</td><td class=\"state state-unhealthy\">unhealthy</td><td>unhealthy · "
        )),
        "{dom}"
    );
    assert!(
        dom.contains(&format!(
            "<td>{}</td><td class=\"state state-routable\">routable</td><td>healthy · ",
            b[0].0
        )),
        "{dom}"
    );
    assert!(dom.contains("next check in"), "{dom}");
    assert!(dom.contains("health: <code>builtin:tcp</code>"), "{dom}");
}
