//! Pool policies on real traffic: passive outlier detection (eject, re-admit, longer second
//! ejection, ejection cap) and retrying 5xx answers on another backend.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

#[test]
fn failing_backend_is_ejected_readmitted_and_ejected_longer_next_time() {
    let b = backends(3);
    let bad = b[0].0.to_string();
    b[0].1.status.store(500, Ordering::Relaxed);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\noutlier = {{ consecutive_failures = 3, base_ejection_time = \"3s\", max_ejection_time = \"20s\" }}\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("outlier", &body);
    // Three 5xx in a row eject it: with exact rotation that is within 9 requests. The outcome
    // is recorded just after the client has its answer, so the ejection is awaited. The base
    // time leaves a loaded machine seconds for the checks made while it lasts.
    for _ in 0..9 {
        proxy.get("/");
    }
    let ejected = || {
        wait_for(Duration::from_secs(5), || {
            backend_field(&proxy, &bad, "state") == "ejected"
        })
    };
    assert!(ejected(), "not ejected after three failures");
    let first = backend_field(&proxy, &bad, "ejected_for_ms")
        .as_u64()
        .unwrap();
    assert!(
        first > 0 && first <= 3000,
        "first ejection lasts the base time: {first}"
    );
    assert_eq!(
        proxy.metric("sluice_outlier_ejections_total{pool=\"web\"}"),
        1.0
    );

    // While ejected, it gets nothing: every answer is a 200 from the others.
    let served_before = b[0].1.served.load(Ordering::Relaxed);
    for _ in 0..20 {
        let r = proxy.get("/");
        assert_eq!(r.status, 200);
        assert_ne!(r.text().trim(), "b1");
    }
    assert_eq!(b[0].1.served.load(Ordering::Relaxed), served_before);

    // It comes back by itself when its time is up (bounded wait)...
    assert!(
        wait_for(Duration::from_secs(10), || backend_field(
            &proxy, &bad, "state"
        ) == "routable"),
        "not re-admitted"
    );
    // ...still failing, it is ejected again, for twice the base time.
    for _ in 0..9 {
        proxy.get("/");
    }
    assert!(ejected(), "not ejected again");
    let second = backend_field(&proxy, &bad, "ejected_for_ms")
        .as_u64()
        .unwrap();
    assert!(
        second > 3000 && second <= 6000,
        "second ejection is longer: {second}"
    );
    assert_eq!(backend_field(&proxy, &bad, "ejections"), 2);
}

#[test]
fn ejection_cap_keeps_part_of_the_pool_in_service() {
    let b = backends(3);
    b[0].1.status.store(500, Ordering::Relaxed);
    b[1].1.status.store(500, Ordering::Relaxed);
    // 50 % of 3 members: at most one ejected at a time, although two are failing.
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\npanic_threshold = 0\noutlier = {{ consecutive_failures = 2, base_ejection_time = \"30s\", max_ejected_percent = 50 }}\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("cap", &body);
    for _ in 0..30 {
        proxy.get("/");
    }
    let v = pools_json(&proxy);
    let states: Vec<_> = v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states.iter().filter(|s| *s == "ejected").count(),
        1,
        "{states:?}"
    );
    assert_eq!(
        proxy.metric("sluice_outlier_ejections_total{pool=\"web\"}"),
        1.0
    );
    assert!(proxy.log().contains("ejection cap is reached"));
}

#[test]
fn five_hundreds_are_retried_for_idempotent_methods_only() {
    let b = backends(2);
    b[0].1.status.store(503, Ordering::Relaxed);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\nretry_on = [\"connect-failure\", \"5xx\"]\noutlier = {{ enabled = false }}\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("retry5xx", &body);
    for i in 0..20 {
        let r = proxy.get("/");
        assert_eq!(r.status, 200, "GET {i} was not retried: {}", r.text());
        assert_eq!(r.text().trim(), "b2");
    }
    assert!(proxy.metric("sluice_retries_total{pool=\"web\",reason=\"5xx\"}") >= 10.0);
    // Each retry is counted once, under its own reason (the backends keep connections alive, so
    // no stale pooled connection was retried).
    assert_eq!(
        proxy.metric("sluice_retries_total{pool=\"web\",reason=\"reused\"}"),
        0.0
    );
    // POST is not idempotent: the 503 goes back to the client as it is.
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            request(proxy.listen, "POST", "/", &[], b"x=1")
                .unwrap()
                .status
        })
        .collect();
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
}

#[test]
fn bad_policy_values_are_refused_with_the_line() {
    let dir = scratch_dir("policy-check");
    let path = dir.join("p.toml");
    std::fs::write(
        &path,
        "[[pool]]\nname = \"web\"\nretry_on = [\"timeouts\"]\n",
    )
    .unwrap();
    let out = sluice_cli(&["check", "--config", path.to_str().unwrap()]);
    let err = out.stderr;
    assert!(!out.ok);
    assert!(
        err.contains(
            "p.toml:3:13: unknown variant `timeouts`, expected one of `connect-failure`, `error`, `5xx`"
        ),
        "{err}"
    );
}

#[test]
fn panic_threshold_balances_over_everyone_when_too_few_are_left() {
    let b = backends(3);
    b[0].1.status.store(500, Ordering::Relaxed);
    b[1].1.status.store(500, Ordering::Relaxed);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\npanic_threshold = 50\noutlier = {{ consecutive_failures = 1, base_ejection_time = \"60s\", max_ejected_percent = 100 }}\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("panic", &body);
    // Before both are ejected, the pool is normal.
    proxy.get("/");
    assert_eq!(pools_json(&proxy)["pools"][0]["panic_mode"], false);
    for _ in 0..6 {
        proxy.get("/");
    }
    // Two of three ejected: 33 % routable < 50 % → panic mode routes to all three again.
    let v = pools_json(&proxy);
    assert_eq!(v["pools"][0]["panic_mode"], true, "{v}");
    let before: Vec<u64> = b
        .iter()
        .map(|(_, x)| x.served.load(Ordering::Relaxed))
        .collect();
    for _ in 0..9 {
        proxy.get("/");
    }
    let after: Vec<u64> = b
        .iter()
        .map(|(_, x)| x.served.load(Ordering::Relaxed))
        .collect();
    assert!(
        after.iter().zip(&before).all(|(a, b)| a > b),
        "every member gets traffic in panic mode: {before:?} -> {after:?}"
    );
}

#[test]
fn zone_aware_prefers_the_local_zone_and_spills_over_when_it_is_gone() {
    let b = backends(3);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{{ addr = \"{}\", zone = \"eu\" }}, {{ addr = \"{}\", zone = \"us\" }}, {{ addr = \"{}\", zone = \"us\" }}]\n\
         panic_threshold = 0\noutlier = {{ consecutive_failures = 1, base_ejection_time = \"60s\" }}\n[[route]]\npool = \"web\"\n",
        b[0].0, b[1].0, b[2].0
    );
    let proxy = Proxy::start_full(scratch_dir("zone"), "zone = \"eu\"", &body);
    let t = tally((0..12).map(|_| proxy.get("/").text()));
    assert_eq!(
        t.get("b1"),
        Some(&12),
        "all traffic stays in zone eu: {t:?}"
    );
    // The local backend fails and is ejected: traffic spills over to the other zone.
    b[0].1.status.store(500, Ordering::Relaxed);
    proxy.get("/");
    // The attempt's outcome is recorded when its lease ends, which can be just after the client
    // has its answer: wait for the ejection to be visible before counting.
    let local = b[0].0.to_string();
    assert!(wait_for(Duration::from_secs(10), || {
        backend_field(&proxy, &local, "state") == "ejected"
    }));
    let t = tally((0..12).map(|_| proxy.get("/").text()));
    assert_eq!(t.get("b1"), None, "{t:?}");
    assert_eq!(t.get("b2"), Some(&6), "{t:?}");
    assert_eq!(t.get("b3"), Some(&6), "{t:?}");
}

#[test]
fn slow_start_ramps_a_new_backend() {
    let b = backends(3);
    let two = format!("\"{}\", \"{}\"", b[0].0, b[1].0);
    let pool = |list: &str| {
        format!("[[pool]]\nname = \"web\"\nbackends = [{list}]\nslow_start = \"60s\"\n[[route]]\npool = \"web\"\n")
    };
    let proxy = Proxy::start("slowstart", &pool(&two));
    let weights = |proxy: &Proxy| -> Vec<u64> {
        pools_json(proxy)["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["effective_weight"].as_u64().unwrap())
            .collect()
    };
    // Backends present at start are at full weight: strategies see the configured weights.
    assert_eq!(weights(&proxy), vec![1, 1]);
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        text.replace(&two, &format!("{two}, \"{}\"", b[2].0)),
    )
    .unwrap();
    assert_eq!(proxy.admin_req("POST", "/api/reload", b"").status, 200);
    // While one ramps, weights are scaled by 100 so the ramp has resolution.
    let w = weights(&proxy);
    assert_eq!(&w[..2], &[100, 100]);
    assert!(
        w[2] >= 10 && w[2] < 30,
        "a new backend starts near 10 % of its weight: {w:?}"
    );
}
