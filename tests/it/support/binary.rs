//! The built `portcullis` binary as its own process, for what only a process
//! shows: signals, exit codes, its memory.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::config::{Config, LogFormat};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A gateway process; killed if dropped while running.
pub struct Process {
    pub child: Child,
    pub pid: i32,
    /// `https://127.0.0.1:PORT`
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub admin_url: String,
    /// Every line the process wrote to stderr so far.
    pub logs: Arc<Mutex<Vec<String>>>,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
}

/// A `portcullis` command with no `PORTCULLIS_*` variables from the test's
/// environment.
pub fn command() -> Command {
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("PORTCULLIS_") {
            command.env_remove(key);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// Writes `config` (JSON logs, so that the listening line can be read) to
/// `dir/gateway.toml`, starts the binary on it and waits until it listens.
pub async fn spawn(mut config: Config, dir: tempfile::TempDir) -> Process {
    config.log.format = LogFormat::Json;
    config.log.level = "info".into();
    spawn_as_configured(config, dir).await
}

/// Like [`spawn`], with the config's own log format and level (the
/// listening line is read in either format).
pub async fn spawn_as_configured(config: Config, dir: tempfile::TempDir) -> Process {
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, config.to_toml()).expect("config written");
    let mut child = command()
        .arg("--config")
        .arg(&config_path)
        .arg("run")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("portcullis binary starts");
    let pid = child.id().expect("pid") as i32;
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::oneshot::channel::<(String, String)>();
    let stderr = child.stderr.take().expect("stderr");
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(pair) = listening(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(pair);
                }
            }
            sink.lock().unwrap().push(line);
        }
    });
    let (addr, admin) = match tokio::time::timeout(Duration::from_secs(60), rx).await {
        Ok(Ok(pair)) => pair,
        _ => {
            let status = child.try_wait();
            panic!(
                "portcullis did not report listening ({status:?}); stderr:\n{}",
                logs.lock().unwrap().join("\n")
            );
        }
    };
    let addr: std::net::SocketAddr = addr.parse().expect("listen address in the log");
    Process {
        child,
        pid,
        url: format!("https://127.0.0.1:{}", addr.port()),
        addr,
        admin_url: format!("http://{admin}"),
        logs,
        config_path,
        dir,
    }
}

/// The addresses of the "portcullis listening" line, JSON or text.
fn listening(line: &str) -> Option<(String, String)> {
    if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
        return (event["message"] == "portcullis listening").then(|| {
            let field = |k: &str| event[k].as_str().unwrap_or_default().to_owned();
            (field("addr"), field("admin_addr"))
        });
    }
    if !line.contains("portcullis listening") {
        return None;
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|token| token.strip_prefix(k)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    Some((field("addr"), field("admin_addr")))
}

impl Process {
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid);
    }

    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for portcullis"),
            Err(_) => panic!(
                "portcullis still running after {limit:?}; stderr:\n{}",
                self.logs()
            ),
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid, field)
    }
}

pub fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}
