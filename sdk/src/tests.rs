//! Tests of the runtime glue and request/host plumbing, through the mock host.

use crate::testing::{backends, Harness, MockHost, TestRequest};
use crate::{
    counter_add, log, random_u64, Attr, Backend, Backends, Config, HostError, Request, Strategy,
};

/// Records what the runtime hands it, and picks whatever `next` says.
#[derive(Debug, Default)]
struct Probe {
    tables: Vec<usize>,
    next: Option<usize>,
    seen: Vec<Option<String>>,
}

impl Strategy for Probe {
    fn init(config: &Config) -> Result<Self, String> {
        if let Some(msg) = config.get_str("fail")? {
            return Err(msg.to_owned());
        }
        Ok(Probe::default())
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.tables.push(backends.len());
    }

    fn pick(&mut self, req: &mut Request, _: &Backends) -> Option<usize> {
        let v = req.header("x-probe").map(str::to_owned);
        self.seen.push(v);
        self.next
    }
}

#[test]
fn lifecycle_runs_through_the_abi_path() {
    let mut h = Harness::<Probe>::new("{}").unwrap();
    h.set_backends(&backends(2));
    h.set_backends(&backends(5));
    assert_eq!(h.strategy().tables, vec![2, 5]);
    assert_eq!(h.backends().len(), 5);
    assert_eq!(h.backends()[4].addr(), "10.0.0.5:80");

    h.strategy_mut().next = Some(3);
    assert_eq!(
        h.pick(&TestRequest::new().header("X-Probe", "yes")),
        Some(3)
    );
    h.strategy_mut().next = None;
    assert_eq!(h.pick(&TestRequest::new()), None);
    assert_eq!(h.strategy().seen, vec![Some("yes".to_owned()), None]);
}

#[test]
fn init_failure_reports_the_message() {
    let err = Harness::<Probe>::new(r#"{"fail": "no thanks"}"#).unwrap_err();
    assert_eq!(err, "no thanks");
    assert_eq!(MockHost::last_error().as_deref(), Some("no thanks"));
    let err = Harness::<Probe>::new(r#"{"fail": 3}"#).unwrap_err();
    assert!(err.contains("`fail`"), "{err}");
    let err = Harness::<Probe>::new("[]").unwrap_err();
    assert!(err.contains("JSON object"), "{err}");
}

#[test]
#[should_panic(expected = "table of 2 backends")]
fn harness_catches_out_of_range_picks() {
    let mut h = Harness::<Probe>::new("{}").unwrap();
    h.set_backends(&backends(2));
    h.strategy_mut().next = Some(2);
    h.pick(&TestRequest::new());
}

#[test]
#[should_panic(expected = "already tried")]
fn harness_catches_excluded_picks() {
    let mut h = Harness::<Probe>::new("{}").unwrap();
    h.set_backends(&backends(2));
    h.strategy_mut().next = Some(1);
    h.pick(&TestRequest::new().attempt(1).exclude(1));
}

#[test]
fn runtime_rejects_foreign_buffers() {
    let mut rt = crate::__private::Runtime::<Probe>::new();
    let buf = rt.alloc(2).unwrap();
    buf.copy_from_slice(b"{}");
    let ptr = buf.as_ptr() as usize;
    assert!(rt.init(ptr + 1, 2).is_err(), "runs past the buffer");
    assert!(
        rt.init(ptr.wrapping_sub(1), 2).is_err(),
        "starts before the buffer"
    );
    assert!(rt.init(ptr, 2).is_ok());
    // Before a table is pushed a pick sees an empty table.
    assert_eq!(rt.pick(0), -1);
}

/// Reads attributes into a log of what it saw; picks nothing.
struct Reader(Vec<Option<String>>);

impl Strategy for Reader {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Reader(Vec::new()))
    }

    fn on_backends(&mut self, _: &Backends) {
        // No request exists outside pick; the host answers -2 and the SDK maps it to None.
        let mut outside = Request::new();
        assert_eq!(outside.client_ip(), None);
        assert_eq!(outside.hash(Attr::ClientIp), None);
    }

    fn pick(&mut self, req: &mut Request, _: &Backends) -> Option<usize> {
        // One at a time: each returned &str borrows the request's buffer.
        self.0 = vec![
            req.client_ip().map(str::to_owned),
            req.method().map(str::to_owned),
            req.host().map(str::to_owned),
            req.path().map(str::to_owned),
            req.uri().map(str::to_owned),
            req.header("ACCEPT").map(str::to_owned),
            req.cookie("sid").map(str::to_owned),
            req.query("q").map(str::to_owned),
            req.header("x-long").map(|v| v.len().to_string()),
            req.header("x-missing").map(str::to_owned),
        ];
        None
    }
}

#[test]
fn request_attributes() {
    let mut h = Harness::<Reader>::new("{}").unwrap();
    h.set_backends(&backends(1));
    let long = "v".repeat(1000); // larger than the initial buffer: exercises grow-and-retry
    let req = TestRequest::new()
        .client_ip("::1")
        .method("POST")
        .host("example.com")
        .path("/a")
        .uri("/a?q=1")
        .header("accept", "text/html")
        .header("Accept", "ignored: only the first value counts")
        .header("x-long", &long)
        .cookie("sid", "abc")
        .query("q", "1");
    h.pick(&req);
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        h.strategy().0,
        vec![
            s("::1"),
            s("POST"),
            s("example.com"),
            s("/a"),
            s("/a?q=1"),
            s("text/html"),
            s("abc"),
            s("1"),
            s("1000"),
            None
        ]
    );

    h.pick(
        &TestRequest::new()
            .without(Attr::ClientIp)
            .without(Attr::Path),
    );
    assert_eq!(h.strategy().0[0], None);
    assert_eq!(h.strategy().0[1], s("GET"));
    assert_eq!(h.strategy().0[3], None);
}

struct Hasher(Option<u64>);

impl Strategy for Hasher {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Hasher(None))
    }

    fn pick(&mut self, req: &mut Request, _: &Backends) -> Option<usize> {
        self.0 = req.hash(Attr::Cookie("sid"));
        None
    }
}

#[test]
fn request_hash_matches_hash_bytes() {
    let mut h = Harness::<Hasher>::new("{}").unwrap();
    h.pick(&TestRequest::new().cookie("sid", "alice"));
    assert_eq!(h.strategy().0, Some(crate::hash_bytes(b"alice")));
    h.pick(&TestRequest::new());
    assert_eq!(h.strategy().0, None);
}

#[test]
fn backend_stats() {
    let mut h = Harness::<Probe>::new("{}").unwrap();
    h.set_backends(&backends(3));
    MockHost::set_inflight(1, 4);
    MockHost::set_latency_us(2, 1500);
    MockHost::set_failures(0, 2);
    let t = Backends::from(backends(3));
    assert_eq!((t.inflight(0), t.inflight(1)), (Some(0), Some(4)));
    assert_eq!(t.latency_us(2), Some(1500));
    assert_eq!(t.failures(0), Some(2));
    // Out of range: the host answers -1.
    assert_eq!(t.inflight(3), None);
    assert_eq!(t.latency_us(usize::MAX), None);
    assert_eq!(t.failures(99), None);
}

#[test]
fn counters_validate_slots() {
    MockHost::reset();
    assert_eq!(counter_add(0, 1), Ok(0));
    assert_eq!(counter_add(0, 1), Ok(1));
    assert_eq!(counter_add(15, -5), Ok(0));
    assert_eq!(MockHost::counter(15), -5);
    assert_eq!(
        counter_add(16, 1),
        Err(HostError::SlotOutOfRange { slot: 16 })
    );
    assert_eq!(
        counter_add(16, 1).unwrap_err().to_string(),
        "counter slot 16 is out of range (0..=15)"
    );
    MockHost::set_counter(1, i64::MAX);
    assert_eq!(counter_add(1, 1), Ok(i64::MAX));
    assert_eq!(MockHost::counter(1), i64::MIN, "wraps");
}

#[test]
fn random_and_clocks_are_deterministic() {
    MockHost::reset();
    let a = [random_u64(), random_u64()];
    assert_ne!(a[0], a[1]);
    MockHost::reset();
    assert_eq!([random_u64(), random_u64()], a);
    MockHost::seed_random(42);
    assert_ne!(random_u64(), a[0]);

    let (t0, m0) = (crate::now_ms(), crate::monotonic_ns());
    MockHost::advance_ms(5);
    assert_eq!(crate::now_ms() - t0, 5);
    assert_eq!(crate::monotonic_ns() - m0, 5_000_000);
}

#[test]
fn logs_are_recorded() {
    MockHost::reset();
    log::warn("careful");
    log::debug("detail");
    let logs = MockHost::take_logs();
    assert_eq!(logs.len(), 2);
    assert_eq!(
        (logs[0].level, logs[0].message.as_str()),
        (log::Level::Warn, "careful")
    );
    assert_eq!(logs[1].level, log::Level::Debug);
    assert!(MockHost::take_logs().is_empty());
}

#[test]
fn retries_walk_until_exhausted() {
    struct First;
    impl Strategy for First {
        fn init(_: &Config) -> Result<Self, String> {
            Ok(First)
        }
        fn pick(&mut self, req: &mut Request, b: &Backends) -> Option<usize> {
            (0..b.len()).find(|&i| !req.is_excluded(i))
        }
    }
    let mut h = Harness::<First>::new("{}").unwrap();
    h.set_backends(&[
        Backend::new("a:1"),
        Backend::new("b:1"),
        Backend::new("c:1"),
    ]);
    assert_eq!(h.retries(&TestRequest::new()), vec![0, 1, 2]);
    assert_eq!(h.retries(&TestRequest::new().exclude(1)), vec![0, 2]);
    h.set_backends(&[]);
    assert_eq!(h.pick(&TestRequest::new()), None);
}

// ---------------------------------------------------------------------------------------------
// Health checks

use crate::testing::HealthHarness;
use crate::{HealthCheck, Probe as HealthProbe, ProbeResult, Verdict};

/// Records what the runtime hands it; probes and verdicts are set by the test.
#[derive(Debug, Default)]
struct Recorder {
    probed: Vec<String>,
    evaluated: Vec<(String, Option<u16>)>,
    next_probe: Option<HealthProbe>,
    next_verdict: Option<Verdict>,
}

impl HealthCheck for Recorder {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&[])?;
        Ok(Recorder::default())
    }

    fn probe(&mut self, backend: &Backend) -> HealthProbe {
        self.probed.push(backend.addr().to_owned());
        self.next_probe.clone().unwrap_or(HealthProbe::TcpConnect)
    }

    fn evaluate(&mut self, backend: &Backend, result: &ProbeResult) -> Verdict {
        self.evaluated
            .push((backend.addr().to_owned(), result.status()));
        self.next_verdict.unwrap_or(Verdict::Healthy)
    }
}

/// Uses only the trait's defaults.
struct Defaults;

impl HealthCheck for Defaults {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Defaults)
    }
}

crate::export_health_check!(Defaults);

#[test]
fn health_defaults_connect_and_accept_success() {
    let mut h = HealthHarness::<Defaults>::new("{}").unwrap();
    let b = Backend::new("10.0.0.1:80");
    assert_eq!(h.probe(&b), HealthProbe::TcpConnect);
    assert_eq!(h.evaluate(&b, &ProbeResult::connected()), Verdict::Healthy);
    assert_eq!(
        h.evaluate(&b, &ProbeResult::connect_failed()),
        Verdict::Unhealthy
    );
    assert_eq!(h.evaluate(&b, &ProbeResult::http(302)), Verdict::Healthy);
    assert_eq!(h.evaluate(&b, &ProbeResult::http(500)), Verdict::Unhealthy);
}

#[test]
fn health_lifecycle_runs_through_the_abi_path() {
    let mut h = HealthHarness::<Recorder>::new("{}").unwrap();
    let a = Backend::new("10.0.0.1:80")
        .with_zone("z")
        .with_tag("canary");
    let b = Backend::new("[::1]:9001");
    h.health_check_mut().next_probe = Some(HealthProbe::http_get("/h").header("host", "x"));
    assert_eq!(h.probe(&a), HealthProbe::http_get("/h").header("host", "x"));
    // Evaluate right after probing the same backend: no second probe.
    assert_eq!(h.evaluate(&a, &ProbeResult::http(200)), Verdict::Healthy);
    // A different backend (or a second evaluation) probes first, as the host always does.
    h.health_check_mut().next_verdict = Some(Verdict::Degraded(30));
    assert_eq!(
        h.evaluate(&b, &ProbeResult::http(500)),
        Verdict::Degraded(30)
    );
    assert_eq!(
        h.evaluate(&b, &ProbeResult::timed_out()),
        Verdict::Degraded(30)
    );
    let c = h.health_check();
    assert_eq!(c.probed, ["10.0.0.1:80", "[::1]:9001", "[::1]:9001"]);
    assert_eq!(
        c.evaluated,
        [
            ("10.0.0.1:80".to_owned(), Some(200)),
            ("[::1]:9001".to_owned(), Some(500)),
            ("[::1]:9001".to_owned(), None)
        ]
    );
    // `check` wires a fake backend in between.
    h.health_check_mut().next_verdict = None;
    let v = h.check(&a, |p| {
        assert!(matches!(p, HealthProbe::Http { .. }));
        ProbeResult::http(204)
    });
    assert_eq!(v, Verdict::Healthy);
}

#[test]
fn health_degraded_out_of_range_is_clamped_not_a_fault() {
    let mut h = HealthHarness::<Recorder>::new("{}").unwrap();
    h.health_check_mut().next_verdict = Some(Verdict::Degraded(0));
    let b = Backend::new("a:1");
    assert_eq!(
        h.evaluate(&b, &ProbeResult::connected()),
        Verdict::Degraded(1)
    );
}

#[test]
#[should_panic(expected = "a plugin fault): probe: path must start with '/'")]
fn health_harness_catches_invalid_probes() {
    let mut h = HealthHarness::<Recorder>::new("{}").unwrap();
    h.health_check_mut().next_probe = Some(HealthProbe::http_get("no-slash"));
    h.probe(&Backend::new("a:1"));
}

#[test]
fn health_init_failure_reports_the_message() {
    let err = HealthHarness::<Recorder>::new(r#"{"path": "/"}"#).unwrap_err();
    assert!(err.contains("`path`"), "{err}");
    assert_eq!(MockHost::last_error().as_deref(), Some(err.as_str()));
}

#[test]
fn health_runtime_rejects_misuse() {
    let mut rt = crate::__private::HealthRuntime::<Recorder>::new();
    let buf = rt.alloc(2).unwrap();
    buf.copy_from_slice(b"{}");
    let ptr = buf.as_ptr() as usize;
    rt.init(ptr, 2).unwrap();
    // A pointer outside the inbox.
    assert!(rt.probe(ptr + 1, 2).unwrap_err().contains("sluice_alloc"));
    // Evaluate before any probe.
    let result = ProbeResult::connected().encode().unwrap();
    let buf = rt.alloc(result.len()).unwrap();
    buf.copy_from_slice(&result);
    let ptr = buf.as_ptr() as usize;
    assert!(rt
        .evaluate(ptr, result.len())
        .unwrap_err()
        .contains("before sluice_health_probe"));
    // A corrupt backend entry.
    let buf = rt.alloc(3).unwrap();
    let ptr = buf.as_ptr() as usize;
    assert!(rt.probe(ptr, 3).unwrap_err().contains("truncated"));
    // The probe buffer survives the allocation of the result buffer.
    let entry = Backend::new("a:1").encode().unwrap();
    let buf = rt.alloc(entry.len()).unwrap();
    buf.copy_from_slice(&entry);
    let ptr = buf.as_ptr() as usize;
    let (probe_ptr, probe_len) = {
        let probe = rt.probe(ptr, entry.len()).unwrap();
        (probe.as_ptr(), probe.len())
    };
    let buf = rt.alloc(result.len()).unwrap();
    buf.copy_from_slice(&result);
    let ptr = buf.as_ptr() as usize;
    assert_eq!(rt.evaluate(ptr, result.len()), Ok(100));
    // SAFETY: the runtime keeps the encoded probe alive until the next probe call; nothing
    // has called `probe` since, so the bytes are still the TCP-connect probe.
    let bytes = unsafe { std::slice::from_raw_parts(probe_ptr, probe_len) };
    assert_eq!(bytes, [0]);
}
