//! A real browser for the tests: Debian's `chromium`, headless, driven
//! through `chromedriver` with the W3C WebDriver protocol (JSON over HTTP,
//! spoken here with reqwest). `.ci/run` installs both (`chromium`,
//! `chromium-driver`); without them `Browser::start` panics saying so.
//!
//! Dropping a `Browser` ends the WebDriver session (chromedriver then quits
//! Chromium), kills chromedriver, and kills any Chromium process still
//! running with this browser's own `--user-data-dir` — by process id, only
//! the ones this browser started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The W3C element reference key.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Bounds every WebDriver call (a page load included).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    http: reqwest::Client,
    driver_addr: SocketAddr,
    /// `http://127.0.0.1:PORT/session/ID`
    session: String,
    session_id: String,
    driver: Option<Child>,
    profile: tempfile::TempDir,
}

fn find_binary(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env).map(PathBuf::from) {
        return path.is_file().then_some(path);
    }
    for candidate in candidates {
        let path = Path::new(candidate);
        if path.is_absolute() {
            if path.is_file() {
                return Some(path.to_path_buf());
            }
            continue;
        }
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(candidate))
                .find(|p| p.is_file())
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port for chromedriver")
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session
    /// that accepts the gateway's self-signed certificate.
    pub async fn start() -> Browser {
        let chromium = find_binary(
            "CHROME_BIN",
            &["chromium", "chromium-browser", "/usr/lib/chromium/chromium"],
        );
        let chromedriver = find_binary(
            "CHROMEDRIVER",
            &["chromedriver", "/usr/lib/chromium/chromedriver"],
        );
        let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
            panic!(
                "the browser test needs Debian's `chromium` and `chromium-driver` \
                 (chromium: {}, chromedriver: {}); install them with \
                 `apt-get install chromium chromium-driver` (.ci/run does), or point \
                 CHROME_BIN / CHROMEDRIVER at them",
                if find_binary("CHROME_BIN", &["chromium", "chromium-browser"]).is_some() {
                    "found"
                } else {
                    "missing"
                },
                if find_binary("CHROMEDRIVER", &["chromedriver"]).is_some() {
                    "found"
                } else {
                    "missing"
                },
            )
        };
        let port = free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", chromedriver.display()));
        let driver_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let profile = tempfile::tempdir().expect("a profile directory for chromium");
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .no_proxy()
            .build()
            .expect("webdriver client");
        let mut browser = Browser {
            http,
            driver_addr,
            session: String::new(),
            session_id: String::new(),
            driver: Some(driver),
            profile,
        };
        browser.wait_for_driver().await;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--ignore-certificate-errors",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-extensions",
                    "--disable-background-networking",
                    "--window-size=1024,768",
                    format!("--user-data-dir={}", browser.profile.path().display()),
                ],
            },
        }}});
        let created = browser
            .http
            .post(format!("http://{driver_addr}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("chromedriver answers POST /session");
        let body: Value = created.json().await.expect("session JSON");
        let id = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver could not start chromium: {body}"))
            .to_owned();
        browser.session = format!("http://{driver_addr}/session/{id}");
        browser.session_id = id;
        browser
    }

    async fn wait_for_driver(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self
                .http
                .get(format!("http://{}/status", self.driver_addr))
                .send()
                .await
                .ok();
            if let Some(response) = ready {
                if let Ok(body) = response.json::<Value>().await {
                    if body["value"]["ready"] == true {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not get ready in 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        let mut request = self.http.request(method.clone(), &url);
        // WebDriver wants a JSON body on every POST, `{}` at least.
        if method == reqwest::Method::POST {
            request = request.json(&body.unwrap_or_else(|| json!({})));
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let status = response.status();
        let value: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: not JSON: {e}"));
        assert!(
            status.is_success(),
            "webdriver {method} {path} answered {status}: {value}"
        );
        value["value"].clone()
    }

    /// Navigates and waits for the load (bounded by chromedriver's page-load
    /// time-out and this client's).
    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    pub async fn current_url(&self) -> String {
        self.command(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// The element matching a CSS selector, waiting for it up to `timeout`.
    pub async fn find(&self, css: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let response = self
                .http
                .post(format!("{}/element", self.session))
                .json(&json!({"using": "css selector", "value": css}))
                .send()
                .await
                .unwrap_or_else(|e| panic!("webdriver find {css}: {e}"));
            if response.status().is_success() {
                let value: Value = response.json().await.expect("element JSON");
                if let Some(id) = value["value"][ELEMENT_KEY].as_str() {
                    return id.to_owned();
                }
            }
            if Instant::now() >= deadline {
                let source = self.command(reqwest::Method::GET, "/source", None).await;
                let source: String = source.as_str().unwrap_or_default().chars().take(600).collect();
                panic!(
                    "no element {css:?} on {} after {timeout:?}; the page: {source}",
                    self.current_url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn type_into(&self, element: &str, text: &str) {
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub async fn click(&self, element: &str) {
        self.command(reqwest::Method::POST, &format!("/element/{element}/click"), None)
            .await;
    }

    /// Polls `current_url` until `accept` says yes, for up to `timeout`;
    /// returns the URL, or panics naming what it saw.
    pub async fn wait_for_url(&self, what: &str, timeout: Duration, accept: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let url = self.current_url().await;
            if accept(&url) {
                return url;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}; the browser is at {url}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the session the polite way (chromedriver quits Chromium).
    pub async fn close(mut self) {
        if !self.session.is_empty() {
            let _ = self.http.delete(&self.session).send().await;
            self.session.clear();
        }
    }

    /// `DELETE /session/ID` without an async runtime (for `Drop`).
    fn delete_session_blocking(&self) {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.driver_addr, Duration::from_secs(2)) else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.session_id, self.driver_addr
        );
        if stream.write_all(request.as_bytes()).is_ok() {
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        }
    }

    /// Chromium processes started with this browser's profile directory.
    fn own_chromium_pids(&self) -> Vec<u32> {
        let marker = format!("--user-data-dir={}", self.profile.path().display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|cmd| cmd.split(|b| *b == 0).any(|arg| arg == marker.as_bytes()))
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            self.delete_session_blocking();
        }
        if let Some(mut driver) = self.driver.take() {
            let _ = driver.kill();
            let _ = driver.wait();
        }
        let pids = self.own_chromium_pids();
        if !pids.is_empty() {
            // SIGKILL, by id: only processes this browser started.
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(pids.iter().map(u32::to_string))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
