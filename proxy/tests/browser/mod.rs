//! A real headless Chromium driven over the DevTools protocol, for the dashboard tests.
//!
//! `--remote-debugging-pipe` makes Chromium read commands from its fd 3 and write answers and
//! events to its fd 4, as JSON messages each ended by a NUL byte: no port and no websocket. Here
//! both are one end of a Unix socket pair. A reader thread splits the messages; every wait is
//! bounded.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one protocol command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(20);

/// A Chromium process with one page open.
pub struct Browser {
    child: Child,
    commands: UnixStream,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
}

impl Browser {
    /// Starts Chromium with its profile in `profile` and opens `url` in a 1400x1800 page.
    pub fn open(url: &str, profile: &Path) -> Browser {
        let (commands, theirs) = UnixStream::pair().unwrap();
        let answers_in = commands.try_clone().unwrap();
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
            "--window-size=1400,1800",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group, so that dropping the browser stops its helper processes
        // too (they would go on writing into the profile while the test removes it).
        .process_group(0);
        // SAFETY: between fork and exec the closure only calls fcntl and dup2, which are
        // async-signal-safe, on a descriptor this process owns until the child has started.
        // dup2 clears close-on-exec on the copies, so fds 3 and 4 reach Chromium (and no other
        // descriptor of ours does).
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto the same number would leave close-on-exec set: copy it away first.
                let src = if fd == 3 || fd == 4 {
                    libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 5)
                } else {
                    fd
                };
                if src < 0 || libc::dup2(src, 3) < 0 || libc::dup2(src, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("Debian's chromium must be installed for this test (scripts/test installs it)");
        // Chromium holds its own end now; ours would keep the socket open after it exits.
        drop(theirs);
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(answers_in);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                if message.last() == Some(&0) {
                    message.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                message.clear();
            }
        });
        let mut b = Browser {
            child,
            commands,
            answers,
            next_id: 0,
            session: String::new(),
        };
        let target = b.browser_command("Target.createTarget", json!({ "url": url }));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = b.browser_command(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b
    }

    fn send(&mut self, method: &str, params: Value, session: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if session {
            msg["sessionId"] = self.session.clone().into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap();
        let deadline = Instant::now() + COMMAND_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .answers
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer to {method} from chromium: {e}"));
            // Events (no id) and answers to earlier commands are not waited for.
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    fn browser_command(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, false)
    }

    /// Sends a command to the page.
    pub fn command(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, true)
    }

    /// The value of a JavaScript expression in the page (a promise is awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.command(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression} threw: {r}"
        );
        r["result"]["value"].clone()
    }

    /// Polls the expression until it is `true` or `limit` passes; returns whether it became so.
    pub fn wait_until(&mut self, expression: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.eval(expression) == Value::Bool(true) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Clicks the middle of the element `selector` finds, with real mouse events. The page may
    /// re-render between aiming and clicking (its tables refresh every 2 s and columns change
    /// width), so the element reports whether the click reached it, and a missed click is
    /// aimed again (a few times at most).
    pub fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        for _ in 0..5 {
            let rect = self.eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                 e.scrollIntoView({{block: 'center'}}); window.__clicked = false; \
                 e.addEventListener('click', () => {{ window.__clicked = true; }}, \
                 {{once: true, capture: true}}); const r = e.getBoundingClientRect(); \
                 return [r.left + r.width / 2, r.top + r.height / 2]; }})()"
            ));
            let (x, y) = match rect.as_array() {
                Some(xy) => (xy[0].as_f64().unwrap(), xy[1].as_f64().unwrap()),
                None => panic!("nothing matches {selector}"),
            };
            for kind in ["mousePressed", "mouseReleased"] {
                self.command(
                    "Input.dispatchMouseEvent",
                    json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
                );
            }
            if self.eval("window.__clicked") == Value::Bool(true) {
                return;
            }
        }
        panic!("clicks never reached {selector}");
    }

    /// Clicks the input `selector` finds and types `text` into it.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector);
        self.command("Input.insertText", json!({ "text": text }));
    }

    /// Sets the files of the file input `selector` finds, as a user choosing them would.
    pub fn choose_file(&mut self, selector: &str, file: &Path) {
        let doc = self.command("DOM.getDocument", json!({}));
        let node = self.command(
            "DOM.querySelector",
            json!({ "nodeId": doc["root"]["nodeId"], "selector": selector }),
        );
        self.command(
            "DOM.setFileInputFiles",
            json!({ "nodeId": node["nodeId"], "files": [file.display().to_string()] }),
        );
    }

    /// A PNG screenshot of the page as it is now.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let shot = self.command(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: Chromium and the renderer, GPU and utility processes it started.
        let group = -(self.child.id() as libc::pid_t);
        // SAFETY: kill(2) with a negative pid signals that process group only; the group is
        // Chromium's own (process_group(0) above), and the child is not yet waited for, so its
        // id, and with it the group id, cannot have been reused.
        unsafe {
            libc::kill(group, libc::SIGKILL);
        }
        let _ = self.child.wait();
        // The profile is free once the whole group is gone (its helpers are reaped by init).
        // Signal 0 only asks whether any member is left; bounded, in case one lingers.
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: as above; signal 0 sends nothing.
        while unsafe { libc::kill(group, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
