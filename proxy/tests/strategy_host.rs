//! The Wasm strategy on the request path of a real sluice process: exact rotation, hot swap under
//! load, refused plugins, and plugin faults that must never fail a request.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

fn web_pool(b: &[(std::net::SocketAddr, std::sync::Arc<DemoBackend>)]) -> String {
    format!("[[pool]]\nname = \"web\"\nstrategy = \"builtin:round-robin\"\nbackends = [{}]\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n", backend_list(b))
}

#[test]
fn round_robin_is_exact_over_300_requests() {
    let b = backends(3);
    let proxy = Proxy::start("rr", &web_pool(&b));
    let bodies: Vec<String> = (0..300).map(|_| proxy.get("/").text()).collect();
    let t = tally(bodies);
    assert_eq!(
        t.values().copied().collect::<Vec<_>>(),
        vec![100, 100, 100],
        "{t:?}"
    );
    for (_, be) in &b {
        assert_eq!(be.served.load(Ordering::Relaxed), 100);
    }
    // Sequence is a strict rotation, not merely balanced.
    let seq: Vec<String> = (0..6).map(|_| proxy.get("/").text()).collect();
    assert_eq!(seq[0..3], seq[3..6]);
    assert!(proxy.metric("sluice_plugin_picks_total{pool=\"web\"}") >= 306.0);
}

#[test]
fn hot_swap_under_load_fails_no_request() {
    let b = backends(3);
    let proxy = Proxy::start("swap", &web_pool(&b));
    let addr = proxy.listen;
    let admin = proxy.admin;
    // 4 client threads on kept-alive connections (at most 5000 requests each and 60 s),
    // swapping midway.
    let served = || -> usize {
        b.iter()
            .map(|(_, be)| be.served.load(Ordering::Relaxed) as usize)
            .sum()
    };
    let load = Load::start(4, 5000, Duration::from_secs(60), move |c| {
        keepalive_get(c, addr, "/")
    });
    // Swap once the load is under way, and keep it going until requests were served after the
    // swap: the swap overlapped requests in flight.
    assert!(
        wait_for(Duration::from_secs(30), || served() >= 200),
        "the load did not start"
    );
    let resp = request(admin, "PUT", "/api/pools/web/strategy", &[], &first_only()).unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.text().contains("sha256"), "{}", resp.text());
    let at_swap = served();
    assert!(
        wait_for(Duration::from_secs(30), || served() >= at_swap + 200),
        "no requests after the swap"
    );
    assert!(!load.is_finished(), "the load ended during the swap");
    let results = load.stop();
    let failed: Vec<_> = results
        .iter()
        .filter(|r| !matches!(r, Ok(r) if r.status == 200))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        results.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(results.len() >= 400);
    // After the swap, every request follows the new strategy: backend 0 only.
    let after = tally((0..30).map(|_| proxy.get("/").text()));
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after.get("b1"), Some(&30), "{after:?}");
    let pools = proxy.admin_req("GET", "/api/pools", b"").text();
    assert!(pools.contains("\"generation\": 2"), "{pools}");
}

/// Each bad plugin is refused with its reason, and the old plugin keeps serving.
#[test]
fn bad_plugins_are_refused_and_the_old_one_keeps_serving() {
    let b = backends(3);
    let proxy = Proxy::start("refuse", &web_pool(&b));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"\x00\x01\x02 definitely not wasm".to_vec(),
            "not a valid WebAssembly module",
        ),
        (
            "wrong ABI version",
            wat_strategy(7, "(i32.const 0)", "(i32.const 0)"),
            "plugin ABI version 7 is not supported",
        ),
        (
            "init traps",
            wat_strategy(1, "(unreachable)", "(i32.const 0)"),
            "plugin init failed",
        ),
        (
            "init refuses",
            wat_strategy(1, "(i32.const 3)", "(i32.const 0)"),
            "sluice_init returned 3",
        ),
        (
            "trial pick out of range",
            wat_strategy(1, "(i32.const 0)", "(i32.const 99)"),
            "returned index 99",
        ),
        (
            "missing export",
            wat::parse_str("(module (memory (export \"memory\") 1))").unwrap(),
            "does not export `sluice_abi_version`",
        ),
        (
            "imports WASI",
            wat::parse_str(
                r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                    (memory (export "memory") 1))"#,
            )
            .unwrap(),
            "plugin imports `wasi_snapshot_preview1::fd_write`, which sluice does not provide",
        ),
        (
            "imports an unknown host call",
            wat::parse_str(
                r#"(module (import "sluice" "open_file" (func (param i32 i32) (result i32)))
                    (memory (export "memory") 1))"#,
            )
            .unwrap(),
            "plugin imports `sluice::open_file`",
        ),
        (
            "text instead of binary",
            b"(module)".to_vec(),
            "only binary modules are accepted",
        ),
        ("empty body", Vec::new(), "empty body"),
        (
            "more code than a plugin may have",
            huge_code_module(5 << 20),
            "KiB of code; the limit is 4096 KiB",
        ),
    ];
    for (name, wasm, expect) in cases {
        let resp = proxy.put_strategy("web", &wasm);
        assert!(
            (400..500).contains(&resp.status),
            "{name}: status {} {}",
            resp.status,
            resp.text()
        );
        assert!(
            resp.text().contains(expect),
            "{name}: expected {expect:?} in {}",
            resp.text()
        );
    }
    let resp = proxy.put_strategy("nope", &first_only());
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert!(
        resp.text().contains(r#"no pool named \"nope\""#),
        "{}",
        resp.text()
    );
    // Still the built-in round-robin, generation 1.
    let t = tally((0..30).map(|_| proxy.get("/").text()));
    assert_eq!(
        t.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{t:?}"
    );
    let pools = proxy.admin_req("GET", "/api/pools", b"").text();
    assert!(
        pools.contains("builtin:round-robin") && pools.contains("\"generation\": 1"),
        "{pools}"
    );
    assert_eq!(
        proxy.metric(
            "sluice_plugin_swaps_total{kind=\"strategy\",pool=\"web\",result=\"rejected\"}"
        ),
        10.0
    );
}

/// A plugin that behaves on ordinary requests (so it passes the trial pick) and misbehaves on
/// requests carrying an `x-bad` header, as a buggy plugin would on some inputs.
fn bad_on_header(bad: &str) -> Vec<u8> {
    wat_strategy(
        1,
        "(i32.const 0)",
        &format!(
            "(if (result i32) (i32.ge_s (call $request_attr (i32.const 4) (i32.const 16) (i32.const 5) (i32.const 64) (i32.const 16)) (i32.const 0)) \
               (then {bad}) \
               (else (i32.rem_u (i32.wrap_i64 (call $counter_add (i32.const 0) (i64.const 1))) (global.get $n))))"
        ),
    )
}

#[test]
fn endless_loop_trap_memory_blowup_and_bad_index_never_fail_a_request() {
    let b = backends(3);
    let proxy = Proxy::start("faults", &web_pool(&b));
    for (name, bad, reason) in [
        ("bad index", "(i32.const 1000)", "bad_index"),
        ("trap", "(unreachable)", "trap"),
        ("endless loop", "(loop $l (br $l)) (i32.const 0)", "deadline"),
        // 2000 pages are 125 MiB, above the 64 MiB cap: the host refuses the growth (-1) and
        // the plugin traps on it. Had the growth succeeded, it would return 0 with no fault.
        ("memory blow-up", "(if (i32.lt_s (memory.grow (i32.const 2000)) (i32.const 0)) (then unreachable)) (i32.const 0)", "trap"),
    ] {
        let resp = proxy.put_strategy("web", &bad_on_header(bad));
        assert_eq!(resp.status, 200, "{name}: {}", resp.text());
        let fallback_before = proxy.metric("sluice_fallback_picks_total{pool=\"web\"}");
        let mut bodies = Vec::new();
        for i in 0..60 {
            let r = request(proxy.listen, "GET", "/", &[("x-bad", "1")], b"").unwrap();
            assert_eq!(r.status, 200, "{name}: request {i} failed: {} {}", r.status, r.text());
            bodies.push(r.text());
            // Ordinary requests interleaved keep being served too.
            assert_eq!(proxy.get("/").status, 200);
        }
        // The fallback is a round-robin too: all three healthy backends share the bad requests.
        let t = tally(bodies);
        assert_eq!(t.len(), 3, "{name}: {t:?}");
        let fallback = proxy.metric("sluice_fallback_picks_total{pool=\"web\"}") - fallback_before;
        assert!(fallback >= 60.0, "{name}: fallback counter moved by {fallback}");
        let faults = proxy.metric(&format!("sluice_plugin_faults_total{{kind=\"strategy\",pool=\"web\",reason=\"{reason}\"}}"));
        assert!(faults >= 1.0, "{name}: fault counter {reason} is {faults}");
    }
    assert!(
        proxy.log().contains("strategy plugin fault"),
        "faults are logged"
    );
}

/// A valid module with one function of `body_bytes` `nop`s: more code than a plugin may have,
/// written as binary directly (the text form would be several times larger to parse).
fn huge_code_module(body_bytes: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, content: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(content.len(), out);
        out.extend_from_slice(content);
    }
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut m); // one type: [] -> []
    section(3, &[1, 0], &mut m); // one function of type 0
    let mut body = vec![0]; // no locals
    body.extend(std::iter::repeat_n(0x01u8, body_bytes)); // nop
    body.push(0x0b); // end
    let mut code = vec![1];
    leb(body.len(), &mut code);
    code.extend_from_slice(&body);
    section(10, &code, &mut m);
    m
}
